"""What the small commands print: `gradsae info` tells the truth about where each backend
runs; `gradsae select` labels its columns and names the token Y is the probability of."""

import json

import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.cli import main


def test_info_says_whether_triton_has_a_gpu(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tri = info["backends"].get("triton")
    assert info["backends"]["reference"]["available"] is True
    if not torch.cuda.is_available():
        assert "interpreter only" in info["triton"] or info["triton"].startswith("unavailable")
        if tri is not None:
            assert tri["available"] is False and tri["reason"]
        assert main(["info"]) == 0
        text = capsys.readouterr().out
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("triton ") and "no" in ln)
        assert " yes" not in line


def test_select_names_the_token_of_y_and_labels_its_columns(tmp_path, capsys):
    m = tm.model("gpt2", d=32, layers=2, seed=5, scale=3.0)
    tok = tm.tokenizer()
    sae = random_sae(32, 64, "topk", k=4, seed=6)
    sae.meta.hook_name = "blocks.1.hook_resid_post"
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae.save(tmp_path / "sae")
    prompt = "the king of the north and the"
    # the spliced model's next token, from an independent dense splice
    hook = tm.DenseSplice(tm.layer_module(m, 1), sae)
    try:
        with torch.no_grad():
            nxt = int(m(tok(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].argmax())
    finally:
        hook.remove()
    word = tok.decode([nxt])
    argv = ["select", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--prompt", prompt,
            "--k", "2"]
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"the probability of the model's next token {word!r} (id {nxt})" in text, text
    assert text.count("latent") >= 2 and "score" in text
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objective_token"] == word and out["objective_token_id"] == nxt
    assert len(out["top"]) == 2


def test_select_method_switch_gives_the_methods_scores(tmp_path, capsys):
    """`gradsae select --method ig|exact` ranks by what GradSAE.score(method=...) computes on
    the same saved model (methods themselves are checked against dense recipes in
    test_methods.py)."""
    import gradsae
    from gradsae.model import GradSAE

    m = tm.model("gpt2", d=32, layers=2, seed=7, scale=3.0)
    tok = tm.tokenizer()
    sae = random_sae(32, 64, "topk", k=4, seed=8)
    sae.meta.hook_name = "blocks.1.hook_resid_post"
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae.save(tmp_path / "sae")
    prompt = "the king of the north and the"
    scorer = GradSAE(m, gradsae.load_sae(tmp_path / "sae"), tokenizer=tok)
    base = ["select", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--prompt", prompt,
            "--k", "3", "--json"]
    for extra, kw in ((["--method", "ig", "--steps", "4"], dict(method="ig", steps=4)),
                      (["--method", "exact", "--budget", "5"], dict(method="exact", latents=5, budget=5))):
        capsys.readouterr()
        assert main([*base, *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        want = scorer.score(prompt, **kw)
        assert [r["latent"] for r in out["top"]] == want.top(3).tolist()
        for r in out["top"]:
            assert abs(r["score"] - float(want.scores[r["latent"]])) <= 1e-6 * (1 + abs(r["score"]))
        assert {"ig": "integrated gradients", "exact": "exact ablation"}[kw["method"]] in out["ranked_by"]
    assert main([*base, "--method", "ig", "--trigger", "["]) == 2
    assert "--method ig scores the prompt itself" in capsys.readouterr().err
