"""The demo bundled in the package: its model and SAEs load and agree with each other, the model
solves its task with and without the SAE spliced, and ``gradsae demo --quick`` runs end to end.

The splice is checked against an independent forward hook (decode(encode(x)) written here from
the SAE's tensors), and answers against the task generator's gold labels, never against values
produced by the code under test."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from gradsae import SAE, load_sae
from gradsae.cli import main as cli_main
from gradsae.demo import bundle, study, task

N_CHECK = 40
MIN_CORRECT = 36  # guessing a value from the context gets about 12/40; the shipped model all (training.json)


@pytest.fixture(scope="module")
def demo():
    model, tok = bundle.load_model()
    saes = {k: bundle.load_demo_sae(k) for k in bundle.SAE_KINDS}
    return model, tok, saes


def _layer_module(model, hook_name: str):
    # blocks.L.hook_resid_post is the output of decoder layer L
    parts = hook_name.split(".")
    assert parts[0] == "blocks" and parts[2] == "hook_resid_post"
    return model.base_model.layers[int(parts[1])]


def _dense_splice(sae: SAE):
    """Independent splice: replace the hook's output by the dense float64 reconstruction."""
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def recon(x):
        pre = (x.double() - b_dec) @ W_enc + b_enc
        if sae.activation == "topk":
            top = pre.topk(sae.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
        else:
            thr = sae.threshold.double().clamp(min=0)
            z = pre * (pre > thr)
        return (z @ W_dec + b_dec).to(x.dtype)

    def hook(module, args, out):
        if isinstance(out, tuple):
            return (recon(out[0]),) + tuple(out[1:])
        return recon(out)

    return hook


def _greedy_answers(model, tok, exs, hook=None, layer=None):
    """Greedy next token after ``Result = [[`` for each example (batched, right-padded)."""
    enc = tok([e.prompt for e in exs], return_tensors="pt", padding=True)
    handle = layer.register_forward_hook(hook) if hook is not None else None
    try:
        with torch.no_grad():
            logits = model(**enc).logits
    finally:
        if handle is not None:
            handle.remove()
    last = enc["attention_mask"].sum(-1) - 1
    pred = logits[torch.arange(len(exs)), last].argmax(-1)
    return tok.convert_ids_to_tokens(pred.tolist())


def test_bundle_files_and_shapes(demo):
    model, tok, saes = demo
    root = bundle.data_dir()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"the bundled demo is {size / 2**20:.1f} MiB; keep it to a few MB"
    assert (root / "model" / "model.safetensors").is_file()
    cfg = model.config
    assert cfg.vocab_size == len(tok) == len(task.VOCAB)
    # the tokenizer is the task's word-level vocabulary, round-tripping a full example
    ex = task.examples(1, seed=99)[0]
    ids = tok(ex.text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ex.text.split()
    assert tok.decode(ids) == ex.text
    for kind, sae in saes.items():
        assert sae.activation == kind
        assert sae.d_in == cfg.hidden_size
        assert sae.d_sae >= 4 * sae.d_in
        assert sae.meta.hook_layer == int(sae.hook_name.split(".")[1])
        assert 0 < sae.meta.hook_layer < cfg.num_hidden_layers - 1, "the SAE should sit at a middle layer"
        # the SAELens files say the same as the loaded object
        cfg_json = json.loads((bundle.sae_dir(kind) / "cfg.json").read_text())
        assert cfg_json["architecture"] == kind
        assert cfg_json["metadata"]["hook_name"] == sae.hook_name
        assert (cfg_json["d_in"], cfg_json["d_sae"]) == (sae.d_in, sae.d_sae)
        assert torch.isfinite(sae.W_enc).all() and torch.isfinite(sae.W_dec).all()
    assert saes["topk"].hook_name == saes["jumprelu"].hook_name
    assert saes["jumprelu"].threshold is not None and bool((saes["jumprelu"].threshold > 0).all())


def test_hook_metadata_resolves_on_the_model(demo):
    from gradsae import GradSAE

    model, tok, saes = demo
    for sae in saes.values():
        scorer = GradSAE(model, sae, tokenizer=tok)  # hook taken from the SAE's own metadata
        assert scorer.point.module is _layer_module(model, sae.hook_name)
        # what flows at that hook is what the SAE was trained on: it reconstructs it well
        ex = task.examples(16, seed=7)
        enc = tok([e.text for e in ex], return_tensors="pt", padding=True)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states[sae.meta.hook_layer + 1]
        x = hs[enc["attention_mask"].bool()]
        err = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert float(err) < 0.25, f"{sae.activation} SAE explains only {1 - float(err):.2f} of the variance"


def test_demo_prompt_answered_with_and_without_splice(demo):
    from gradsae import GradSAE

    model, tok, saes = demo
    exs = task.examples(N_CHECK, seed=study.EVAL_SEED + 77)
    gold = [e.answer for e in exs]
    clean = _greedy_answers(model, tok, exs)
    n_clean = sum(a == g for a, g in zip(clean, gold))
    assert n_clean >= MIN_CORRECT, f"the demo model answers {n_clean}/{N_CHECK} lookups"
    first = clean.index(next(g for a, g in zip(clean, gold) if a == g))  # a prompt it answers
    ex = exs[first]
    for kind, sae in saes.items():
        layer = _layer_module(model, sae.hook_name)
        spliced = _greedy_answers(model, tok, exs, _dense_splice(sae), layer)
        assert spliced[first] == gold[first], kind
        n_spliced = sum(a == g for a, g in zip(spliced, gold))
        assert n_spliced >= MIN_CORRECT, (kind, n_spliced, n_clean)
        # gradsae's own splice gives the same logits as the independent hook
        scorer = GradSAE(model, sae, tokenizer=tok)
        enc = tok([ex.prompt], return_tensors="pt")
        with torch.no_grad(), scorer.spliced():
            ours = model(**enc).logits
        handle = layer.register_forward_hook(_dense_splice(sae))
        try:
            with torch.no_grad():
                ref = model(**enc).logits
        finally:
            handle.remove()
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        # and the spliced model writes the answer in the paper's format from the question alone
        text = scorer.generate(ex.question, max_new_tokens=8).text
        # (the answer is the first [[ ... ]], as the paper's parser reads it; the toy model may
        # keep writing after it, since its training sequences hold several questions)
        assert text.startswith(f"Result = [[ {ex.answer} ]]"), (kind, text)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "plot.png"
    rc = cli_main(["demo", "--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != out.name], "temporary files left behind"
    assert "GradSAE Top-K" in printed and "top 5 latents by GradSAE" in printed
    rows = [line for line in printed.splitlines() if line.strip().startswith(("1 ", "50% "))]
    assert len(rows) == len(study.QUICK_KS)
    for row in rows:
        accs = [float(v) for v in re.findall(r"(\d+\.\d)\s*\(", row)]  # "acc (masked)" cells
        assert len(accs) == 4 and all(0.0 <= a <= 100.0 for a in accs), row


def test_demo_quick_result_matches_its_records(tmp_path):
    res = study.run_demo(n_prompts=6, ks=(1,), out=tmp_path / "p.png", progress=False,
                         stream=open(tmp_path / "log.txt", "w"))
    assert 1 <= res.n_kept <= 6
    gold = {e["id"]: e["answers"][0] for e in study.demo_examples(6)}
    recs = res.experiment.records
    assert len(recs) == res.n_kept * 4  # 2 methods x top/bottom at one K
    for (method, sel, k), acc in res.accuracy.items():
        mine = [r for r in recs if (r["method"], r["selection"], r["K"]) == (method, sel, k)]
        assert all(len(r["latents"]) == 1 for r in mine)
        assert acc == pytest.approx(100.0 * sum(r["answer"] == gold[r["id"]] for r in mine) / len(mine))


def test_demo_fails_clearly_on_missing_weights(tmp_path, capsys):
    rc = cli_main(["demo", "--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "demo model is incomplete" in err and "config.json" in err
    # a model without its SAEs names the missing SAE directory
    shutil.copytree(bundle.data_dir() / "model", tmp_path / "partial" / "model")
    rc = cli_main(["demo", "--quick", "--data", str(tmp_path / "partial"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "sae_topk" in err
    assert not (tmp_path / "x.png").exists()
