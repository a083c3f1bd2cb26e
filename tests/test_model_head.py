"""The split output head (gradsae.model.head): objectives from hidden states equal the same
objectives on the model's own logits, the chunked loss equals float64 autograd, and models whose
head is not known to be plain keep using their own forward."""

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from oracle import random_sae

from gradsae.model import GradSAE
from gradsae.model import head as H
from gradsae.model import objectives as O

D = 32


def _padded_batch(side: str, B: int = 3, T: int = 9):
    ids = torch.randint(4, tm.VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(torch.randint(3, T + 1, (B,)).tolist()):
        if side == "right":
            mask[b, n:] = False
        else:
            mask[b, : T - n] = False
    mask[0] = True  # one full row
    return torch.where(mask, ids, torch.zeros_like(ids)), mask


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_nll_matches_float64_autograd(monkeypatch, softcap, bias):
    V, d, N, n_out = 37, 8, 23, 5
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", 3 * V + 1)  # 3 positions per chunk, the last one short
    W = torch.randn(V, d, dtype=torch.float64) * 2
    b = torch.randn(V, dtype=torch.float64) if bias else None
    head = H.Head(torch.nn.Identity(), W, b, softcap)
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    rows = torch.randint(0, n_out, (N,))
    weights = torch.rand(N, dtype=torch.float64) + 0.1
    weights[::3] *= -1  # negative weights: the log-likelihood objective
    gy = torch.randn(n_out, dtype=torch.float64)

    y = H.chunked_nll(head, h, targets, weights, rows, n_out)
    (g,) = torch.autograd.grad(y, h, gy)

    h2 = h.detach().clone().requires_grad_(True)
    lg = F.linear(h2, W, b)
    if softcap:
        lg = torch.tanh(lg / softcap) * softcap
    nll = F.cross_entropy(lg, targets, reduction="none")
    y2 = torch.zeros(n_out, dtype=torch.float64).index_add(0, rows, nll * weights)
    (g2,) = torch.autograd.grad(y2, h2, gy)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_split_head_recognises_architectures(arch):
    m = tm.model(arch, d=D)
    head = H.split_head(m)
    assert head is not None
    assert head.weight is m.get_output_embeddings().weight
    ids = torch.randint(4, tm.VOCAB, (2, 7))
    with torch.no_grad():
        want = m(ids).logits
        got = head.logits(head.body(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (head.softcap is not None) == (getattr(m.config, "final_logit_softcapping", None) is not None)


OBJECTIVES = [("loss", {}), ("predicted_prob", {}), ("logprob", {"target": 7}), ("logit_diff", {"a": 5, "b": 9}),
              ("loglik", {})]


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("mode", ["splice", "error"])
def test_attribution_without_logits_equals_with_logits(arch, mode, monkeypatch):
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", 4 * tm.VOCAB)  # several loss chunks per batch
    m = tm.model(arch, d=D, scale=3.0).double()
    # eager attention in float64 leaves NaN in fully masked (left-pad) query rows, which then
    # reach real rows as 0 * NaN; sdpa does not (gemma2's soft-capped attention is eager only)
    left = "right" if arch == "gemma2" else "left"
    if arch != "gemma2":
        m.config._attn_implementation = "sdpa"
    sae = random_sae(D, 96, "topk", k=6, dtype=torch.float64)
    sc = GradSAE(m, sae, hook="blocks.1.hook_resid_post", mode=mode)
    for side, (objective, kw) in zip(["right", left, "right", left, left], OBJECTIVES):
        ids, mask = _padded_batch(side)
        pos = 1 if objective == "logit_diff" else -1
        fast = sc.attribute(ids, mask, objective=objective, position=pos, **kw)
        full = sc.attribute(ids, mask, objective=objective, position=pos, keep_logits=True, **kw)
        assert fast.logits is None and full.logits is not None
        torch.testing.assert_close(fast.objective, full.objective, rtol=1e-10, atol=1e-12)
        assert torch.equal(fast.influence.indices, full.influence.indices)
        scale = full.influence.grads.abs().max()
        assert scale > 0, "vacuous: no gradient reached the SAE"
        torch.testing.assert_close(fast.influence.grads, full.influence.grads, rtol=0, atol=1e-9 * float(scale))


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("objective", ["loglik", "loss"])
def test_sequence_objectives_from_hidden_match_float64_autograd(monkeypatch, objective, softcap):
    """loglik (the corpus default) and loss through the split head, values and gradients with
    respect to the hidden states, against log_softmax on the full logits in float64; loglik is
    the mean log-probability of each actual next token, so it must equal -loss."""
    V, d, B, T = 29, 6, 3, 8
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", 2 * V + 1)  # 2 positions per chunk
    W = torch.randn(V, d, dtype=torch.float64) * 2
    head = H.Head(torch.nn.Identity(), W, torch.randn(V, dtype=torch.float64), softcap)
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    mask[2, :3] = False  # left padding
    gy = torch.randn(B, dtype=torch.float64)

    y = O.evaluate_hidden(objective, head, hidden, ids, mask)
    (g,) = torch.autograd.grad(y, hidden, gy)

    h2 = hidden.detach().clone().requires_grad_(True)
    lg = F.linear(h2, W, head.bias)
    if softcap:
        lg = torch.tanh(lg / softcap) * softcap
    logp = lg.log_softmax(-1)
    want = []
    for b in range(B):
        pos = mask[b].nonzero().flatten().tolist()
        lp = torch.stack([logp[b, t, ids[b, t + 1]] for t in pos[:-1]])
        want.append(lp.mean() if objective == "loglik" else -lp.mean())
    y2 = torch.stack(want)
    (g2,) = torch.autograd.grad(y2, h2, gy)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)
    assert float(g.abs().max()) > 0
    # and the same value from the logits path
    torch.testing.assert_close(O.evaluate(objective, lg.detach(), ids, mask), y.detach(), rtol=1e-12, atol=1e-12)
    if objective == "loglik":
        torch.testing.assert_close(y, -O.evaluate_hidden("loss", head, hidden, ids, mask), rtol=1e-12, atol=0)


def test_bf16_autocast_without_logits_stays_close():
    m = tm.model("llama", d=D, scale=3.0)
    sae = random_sae(D, 96, "topk", k=6)
    sc = GradSAE(m, sae, hook="blocks.1.hook_resid_post")
    ids, mask = _padded_batch("right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = sc.attribute(ids, mask, objective="loss")
        full = sc.attribute(ids, mask, objective="loss", keep_logits=True)
    torch.testing.assert_close(fast.objective, full.objective, rtol=2e-2, atol=0)
    scale = float(full.influence.grads.abs().max())
    err = float((fast.influence.grads - full.influence.grads).abs().max())
    assert scale > 0 and err <= 5e-2 * scale, (err, scale)


def test_models_with_modified_heads_use_their_own_logits():
    m = tm.model("gpt2", d=D, scale=3.0).double()
    sae = random_sae(D, 96, "topk", k=6, dtype=torch.float64)
    sc = GradSAE(m, sae, hook="blocks.1.hook_resid_post")
    ids, mask = _padded_batch("right")
    plain = sc.attribute(ids, mask, objective="loss").objective
    # a hook on the head (a temperature) changes the logits: the split head must not be used
    handle = m.get_output_embeddings().register_forward_hook(lambda mod, a, out: out / 2)
    try:
        assert H.split_head(m) is None
        hot = sc.attribute(ids, mask, objective="loss")
    finally:
        handle.remove()
    assert hot.logits is not None  # the model's own forward ran
    assert not torch.allclose(hot.objective, plain)
    # a module that is not a transformers causal LM
    assert H.split_head(torch.nn.Linear(3, 3)) is None
