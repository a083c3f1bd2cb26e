"""scorer.validate and `gradsae validate`: the statistics against NumPy, the per-latent rows
against independent dense recipes (first-order and ablation by forward hooks), the files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.cli import main
from gradsae.errors import InputError
from gradsae.model import GradSAE
from gradsae.model.validate import pearson, spearman, topk_overlap

D = 32
HOOK = "blocks.0.hook_resid_post"
PROMPTS = ["the question is what king was in the north", "answer : the river of fire",
           "please organize your final answer in this format"]


def np_ranks(v):
    """Average ranks, written out: each value's rank is the mean of the positions it spans."""
    v = np.asarray(v, dtype=np.float64)
    out = np.empty(len(v))
    srt = np.sort(v)
    for i, x in enumerate(v):
        lo = np.searchsorted(srt, x, side="left")
        hi = np.searchsorted(srt, x, side="right")
        out[i] = (lo + 1 + hi) / 2
    return out


def test_statistics_match_numpy():
    a = torch.randn(40, dtype=torch.float64)
    b = a * 0.5 + torch.randn(40, dtype=torch.float64)
    b[3] = b[7] = b[11]  # ties
    assert abs(pearson(a, b) - np.corrcoef(a.numpy(), b.numpy())[0, 1]) <= 1e-12
    want = np.corrcoef(np_ranks(a.numpy()), np_ranks(b.numpy()))[0, 1]
    assert abs(spearman(a, b) - want) <= 1e-12
    assert np.isnan(pearson(torch.ones(5), torch.randn(5)))
    x = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    y = torch.tensor([1.0, 4.0, 5.0, 2.0, 3.0])
    assert topk_overlap(x, y, 2) == 0.5  # {0, 1} vs {2, 1}
    assert topk_overlap(x, y, 10) == 1.0  # K larger than the candidates: all of them


def dense_first_order_and_ablation(m, sae, ids, latents):
    """Per latent: sum over positions of z * dY/dz (retain_grad) and Y(clean) - Y(z_j = 0),
    with Y the argmax-token probability at the last position."""
    hook = tm.DenseSplice(tm.layer_module(m, 0), sae)
    try:
        y = m(ids).logits[:, -1].softmax(-1).max(-1).values
        y.sum().backward()
    finally:
        hook.remove()
        m.zero_grad(set_to_none=True)
    y = y.detach()
    z = hook.zs[0]
    fo = (z * z.grad)[0].sum(0).detach()
    out = []
    for j in latents:
        def edit(zz, j=j):
            zz = zz.clone()
            zz[..., j] = 0
            return zz
        h = tm.DenseSplice(tm.layer_module(m, 0), sae, edit=edit)
        try:
            with torch.no_grad():
                ya = m(ids).logits[:, -1].softmax(-1).max(-1).values
        finally:
            h.remove()
        out.append(float(y[0] - ya[0]))
    return fo, out


def test_validate_rows_and_summary():
    m = tm.model("llama", d=D, scale=3.0, seed=2).double()
    sae = random_sae(D, 96, "topk", k=6, dtype=torch.float64, seed=3)
    tok = tm.tokenizer()
    sc = GradSAE(m, sae, hook=HOOK, tokenizer=tok)
    v = sc.validate(PROMPTS, K=3, steps=4, budget=5, batch_size=2)
    assert v.n_prompts == 3 and v.K == 3
    by_prompt = {}
    for r in v.rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert sorted(by_prompt) == [0, 1, 2]
    for p, rows in by_prompt.items():
        assert len(rows) == 5
        ids = tok(PROMPTS[p], return_tensors="pt")["input_ids"]
        lat = [r["latent"] for r in rows]
        fo, ex = dense_first_order_and_ablation(m, sae, ids, lat)
        for r, e in zip(rows, ex):
            assert abs(r["grad"] - float(fo[r["latent"]])) <= 1e-9 * max(1e-3, abs(r["grad"]))
            assert abs(r["exact"] - e) <= 1e-9 * max(1e-3, abs(e))
        # candidates: the active latents with the largest first-order |score|
        mags = [abs(r["grad"]) for r in rows]
        assert mags == sorted(mags, reverse=True)
        others = torch.nonzero(fo).flatten().tolist()
        rest = [abs(float(fo[j])) for j in others if j not in lat]
        assert not rest or max(rest) <= min(mags) + 1e-15
        ig = sc.score(PROMPTS[p], method="ig", steps=4, reduce="sum", sign="signed")
        for r in rows:
            assert abs(r["ig"] - float(ig.scores[r["latent"]])) <= 1e-9 * max(1e-3, abs(r["ig"]))
    # the summary from the rows, recomputed with NumPy
    for a, b in (("grad", "exact"), ("ig", "exact"), ("grad", "ig")):
        va = np.array([r[a] for r in v.rows])
        vb = np.array([r[b] for r in v.rows])
        s = v.summary[f"{a}~{b}"]
        assert s["n"] == 15
        assert abs(s["pearson"] - np.corrcoef(va, vb)[0, 1]) <= 1e-9
        assert abs(s["spearman"] - np.corrcoef(np_ranks(va), np_ranks(vb))[0, 1]) <= 1e-9
        assert abs(s["sign_agreement"] - np.mean(np.sign(va) == np.sign(vb))) <= 1e-12
        ov = []
        for p in range(3):
            rows = [r for r in v.rows if r["prompt"] == p]
            ta = {r["latent"] for r in sorted(rows, key=lambda r: -r[a])[:3]}
            tb = {r["latent"] for r in sorted(rows, key=lambda r: -r[b])[:3]}
            ov.append(len(ta & tb) / 3)
        assert abs(s["topk_overlap"] - np.mean(ov)) <= 1e-12
    assert "grad vs exact" in v.table()
    with pytest.raises(InputError, match="K must be"):
        sc.validate(PROMPTS, K=0)
    with pytest.raises(InputError, match="budget"):
        sc.validate(PROMPTS, budget=0)
    with pytest.raises(InputError, match="at least one prompt"):
        sc.validate([])


def test_validate_writes_files(tmp_path):
    m = tm.model("gpt2", d=D, scale=3.0, seed=4).double()
    sae = random_sae(D, 64, "topk", k=4, dtype=torch.float64, seed=5)
    sc = GradSAE(m, sae, hook=HOOK, tokenizer=tm.tokenizer())
    v = sc.validate(PROMPTS[:2], K=2, steps=2, budget=3)
    paths = v.write(tmp_path / "val")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(v.rows) == 6
    assert float(rows[0]["exact"]) == v.rows[0]["exact"]
    data = json.loads(paths["json"].read_text())
    assert data["summary"].keys() == v.summary.keys() and data["K"] == 2
    assert paths["png"] is not None and paths["png"].stat().st_size > 1000  # matplotlib is in the test env


def test_cli_validate_demo(tmp_path, capsys):
    out = tmp_path / "val"
    assert main(["validate", "--demo", "--prompts", "3", "--steps", "2", "--budget", "4", "--k", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "grad vs exact" in text and "ig vs exact" in text
    assert {p.name for p in out.iterdir()} == {"validate.csv", "validate.json", "validate.png"}
    data = json.loads((out / "validate.json").read_text())
    assert data["n_prompts"] == 3 and len(data["rows"]) <= 12 and data["rows"]


def test_cli_validate_model_and_prompts_file(tmp_path, capsys):
    m = tm.model("gpt2", d=D, layers=2, seed=1, scale=3.0)
    m.save_pretrained(tmp_path / "model")
    tm.tokenizer().save_pretrained(tmp_path / "model")
    sae = random_sae(D, 64, "topk", k=4, seed=2)
    sae.meta.hook_name = HOOK
    sae.save(tmp_path / "sae")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "val"
    assert main(["validate", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--prompts-file",
                 str(tmp_path / "p.txt"), "--prompts", "2", "--mode", "error", "--steps", "2", "--budget", "3",
                 "--objective", "logprob", "--target", "king", "--out", str(out), "--no-plot",
                 "--device", "cpu"]) == 0
    assert "error mode" in capsys.readouterr().out
    data = json.loads((out / "validate.json").read_text())
    assert data["n_prompts"] == 2 and data["mode"] == "error" and data["objective"] == "logprob"
    assert {r["prompt"] for r in data["rows"]} == {0, 1}
    assert not (out / "validate.png").exists()
