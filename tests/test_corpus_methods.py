"""A corpus run with method="ig": its statistics are those of GradSAE.attribute(method="ig")
on each document (integrated gradients are checked against a dense float64 path integral in
test_methods.py); what a corpus run cannot do is refused before the first batch."""

import json

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae.errors import InputError
from gradsae.model import GradSAE
from gradsae.stats import LatentStats

HOOK = "blocks.1.hook_resid_post"


def _docs(n=5):
    return [" ".join(tm.WORDS[(i * 5 + k) % len(tm.WORDS)] for k in range(3 + i)) for i in range(n)]


def test_ig_corpus_statistics_equal_per_document_ig():
    seed = int(torch.randint(0, 2**30, ()).item())
    m = tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0).double()
    sae = random_sae(32, 64, "topk", k=4, dtype=torch.float64, seed=seed + 1)
    tok = tm.tokenizer()
    docs = _docs()
    res = gradsae.score_corpus(m, sae, docs, hook=HOOK, tokenizer=tok, method="ig", steps=3, max_length=16,
                               batch_tokens=32, progress=False)
    want = LatentStats(sae.d_sae)
    scorer = GradSAE(m, sae, hook=HOOK, tokenizer=tok)
    for d in docs:
        ids = torch.tensor([tok(d)["input_ids"]])
        att = scorer.attribute(ids, objective="loglik", method="ig", steps=3)
        want.update(att.influence, att.mask)
    grad = gradsae.score_corpus(m, sae, docs, hook=HOOK, tokenizer=tok, max_length=16, batch_tokens=32,
                                progress=False)
    assert res.meta["config"]["method"] == "ig" and res.meta["config"]["steps"] == 3
    assert torch.equal(res.stats.count, want.count)
    for f in ("score_sum", "relu_sum", "abs_sum"):
        torch.testing.assert_close(getattr(res.stats, f), getattr(want, f), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(getattr(res.stats, f), getattr(grad.stats, f))  # IG is not the first order


def test_what_a_corpus_run_refuses(tmp_path):
    m = tm.model("gpt2", d=32, layers=2, seed=1)
    sae = random_sae(32, 64, "topk", k=4, seed=2)
    tok = tm.tokenizer()
    with pytest.raises(InputError, match="exact ablation is per prompt"):
        gradsae.score_corpus(m, sae, _docs(), hook=HOOK, tokenizer=tok, method="exact")
    with pytest.raises(InputError, match="steps must be"):
        gradsae.score_corpus(m, sae, _docs(), hook=HOOK, tokenizer=tok, method="ig", steps=0)
    two = {HOOK: sae, "blocks.0.hook_resid_post": random_sae(32, 48, "topk", k=3, seed=3)}
    with pytest.raises(InputError, match="one SAE"):
        gradsae.score_corpus(m, two, _docs(), tokenizer=tok, method="ig", out=tmp_path / "r")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
