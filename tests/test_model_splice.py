"""The splice's own contract: the backend a GradSAE is given serves every step of the splice
(encode, sparse decode, gather-dot), and recording is a context manager that leaves nothing
behind."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import InputError
from gradsae.model import GradSAE
from gradsae.op import get_backend, register_backend, unregister_backend

PROMPT = "the question is what king was in the north"


class Spy:
    """A backend that counts what it is asked and computes with the reference; its sparse
    decode is the PyTorch embedding-bag decode of the SAE itself."""

    name = "spy"

    def __init__(self):
        self.calls = {"select": 0, "influence": 0, "gather_dot": 0, "decode_sparse": 0}

    def unsupported(self, req):
        return None if req.explicit else "serves only when named"

    def select(self, req):
        self.calls["select"] += 1
        return get_backend("reference").select(req)

    def influence(self, req):
        self.calls["influence"] += 1
        return get_backend("reference").influence(req)

    def gather_dot(self, W_dec, idx, D, row_scale=None, col_scale=None):
        self.calls["gather_dot"] += 1
        return get_backend("reference").gather_dot(W_dec, idx, D, row_scale, col_scale)

    def decode_sparse(self, sae, idx, acts):
        self.calls["decode_sparse"] += 1
        return sae.linear_decode_sparse(idx, acts) + sae.b_dec


@pytest.fixture
def spy():
    b = Spy()
    register_backend(b)
    yield b
    unregister_backend("spy")


def parts(mode="splice"):
    m = tm.model("llama", scale=3.0).double()
    sae = random_sae(32, 64, "topk", k=6, dtype=torch.float64)
    return m, sae, tm.tokenizer()


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_the_named_backend_serves_encode_decode_and_gather(spy, mode):
    m, sae, tok = parts()
    want = GradSAE(m, sae, mode=mode, hook="blocks.0.hook_resid_post", tokenizer=tok).score(PROMPT)
    got = GradSAE(m, sae, mode=mode, hook="blocks.0.hook_resid_post", tokenizer=tok, backend="spy").score(PROMPT)
    assert spy.calls["select"] == 1 and spy.calls["gather_dot"] == 1
    assert spy.calls["decode_sparse"] == (1 if mode == "splice" else 0)  # error mode decodes nothing
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-12, atol=1e-14)
    assert got.objective == pytest.approx(want.objective, abs=1e-12)


def test_reference_backend_runs_the_whole_splice():
    """backend='reference' (no sparse-decode kernel) decodes in PyTorch and runs its own
    gather-dot in the backward."""
    m, sae, tok = parts()
    auto = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok).score(PROMPT)
    ref = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok, backend="reference").score(PROMPT)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][0]
    paper, _, _ = tm.paper_scores(m, sae, 0, ids)
    torch.testing.assert_close(ref.scores, paper, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ref.scores, auto.scores, rtol=1e-12, atol=1e-14)


def test_recording_is_scoped_and_nests_with_editing():
    m, sae, tok = parts()
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    sp = sc.splice
    layer = tm.layer_module(m, 0)
    ids, mask = sc.encode_batch(PROMPT)
    with sc.intervene(zero=[1]):
        with sp.recording(mask=mask, last_index=None) as rec:
            assert layer._forward_hooks and len(sp.interventions) == 1
            with torch.enable_grad():
                sc.forward(ids, mask).logits[0, -1].max().backward()
        assert len(rec.entries) == 1 and len(rec.influences) == 1
        assert layer._forward_hooks  # still attached for the intervention
        sc.forward(ids, mask)  # a plain forward is not recorded any more
        assert len(rec.entries) == 1
    assert not layer._forward_hooks and sp.interventions == []


def test_recording_unwinds_on_error():
    m, sae, tok = parts()
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    with pytest.raises(InputError, match="does not depend on the hook"):
        sc.attribute(PROMPT, objective=lambda logits, ids, mask: torch.zeros(ids.shape[0]))
    assert not tm.layer_module(m, 0)._forward_hooks
    assert sc.score(PROMPT).objective > 0  # the splice works as before
