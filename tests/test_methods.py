"""Attribution methods beyond the first-order score (gradsae.model.methods) against independent
dense float64 recipes: integrated gradients, exact zero-ablation, the error node and the
counterfactual (attribution-patching) baseline. The recipes below use the SAE's raw weights,
dense latents, forward hooks and autograd only (tests/tiny_models), no gradsae code."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import GradSAEWarning, InputError
from gradsae.model import GradSAE

D = 32
HOOK = "blocks.0.hook_resid_post"
TEXT = "the question is what king was in the north"
CORRUPT = "the answer is what queen was in the south"  # same token count as TEXT


def setup(arch="llama", mode="splice", seed=0, d_sae=96, k=6, activation="topk"):
    m = tm.model(arch, d=D, scale=3.0, seed=seed).double()
    sae = random_sae(D, d_sae, activation, k=k, dtype=torch.float64, seed=seed + 1)
    tok = tm.tokenizer()
    return m, sae, tok, GradSAE(m, sae, hook=HOOK, mode=mode, tokenizer=tok)


def ids_of(tok, text):
    return tok(text, return_tensors="pt")["input_ids"][0]


def close(a, b, rtol, atol=0.0):
    a, b = a.double(), b.double()
    err = (a - b).abs()
    bound = atol + rtol * b.abs().max()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3e}, bound {float(bound):.3e}"


TARGET = 7  # IG's objective: the log-probability of a fixed token (smooth along the path)


def logprob_y(logits):
    return logits[:, -1].log_softmax(-1)[:, TARGET]


def dense_y(m, sae, ids, mode="splice", edit=None, objective=None):
    """Y of the model with the SAE spliced densely (tests/tiny_models.DenseSplice), no grad."""
    hook = tm.DenseSplice(tm.layer_module(m, 0), sae, mode, edit=edit)
    try:
        with torch.no_grad():
            logits = m(ids).logits
    finally:
        hook.remove()
    return objective(logits) if objective is not None else logits[:, -1].softmax(-1).max(-1).values


# ------------------------------------------------------------------------------------ IG
class LinearLM(torch.nn.Module):
    """Embedding -> linear -> hook (an Identity) -> linear head: the logits are affine in the
    hook's output, so any objective linear in the logits is linear in the SAE's latents."""

    def __init__(self, vocab=tm.VOCAB, d=D):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.inner = torch.nn.Linear(d, d)
        self.hook = torch.nn.Identity()
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.hook(torch.tanh(self.inner(self.emb(input_ids))))
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_ig_equals_first_order_when_y_is_linear_in_z(mode):
    m = LinearLM().double().eval()
    sae = random_sae(D, 64, "topk", k=5, dtype=torch.float64)
    sc = GradSAE(m, sae, hook="hook", mode=mode)
    ids = torch.randint(4, tm.VOCAB, (2, 6))
    obj = lambda logits, input_ids, mask: logits[:, -1, 7] - 0.5 * logits[:, 2, 3]  # noqa: E731
    g = sc.attribute(ids, objective=obj)
    for steps in (1, 3, 8):
        ig = sc.attribute(ids, objective=obj, method="ig", steps=steps)
        assert ig.method == f"ig{steps}"
        assert torch.equal(ig.influence.indices, g.influence.indices)
        close(ig.influence.acts, g.influence.acts, 1e-12)
        close(ig.influence.grads, g.influence.grads, 1e-10)
        close(ig.influence.scores, g.influence.scores, 1e-10)
        close(ig.objective, g.objective, 1e-12)
    assert bool((g.influence.scores != 0).any())


def dense_ig(m, sae, ids, nodes: int = 48, mode="splice", start=None):
    """The path integral (z - z0) * int_0^1 dY/dz(z0 + alpha (z - z0)) d alpha, dense and in
    float64, by Gauss-Legendre quadrature (all nodes in one batch: row i carries the path at
    alpha_i), with Y(z) and Y(z0); z0 = ``start`` ([1, T, d_sae]) or zero.
    Returns (ig [T, d_sae], Y(z), Y(z0))."""
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    alphas = torch.tensor((xs + 1) / 2, dtype=torch.float64)
    weights = torch.tensor(ws / 2, dtype=torch.float64)
    seen = {}

    def hook(mod, args, out):
        x = (out[0] if isinstance(out, tuple) else out).detach()
        z = tm.dense_encode(sae, x)
        z0 = torch.zeros_like(z) if start is None else start
        zs = (z0 + alphas.view(-1, 1, 1) * (z - z0)).requires_grad_(True)
        seen["z"], seen["zs"] = z, zs
        xh = tm.dense_decode(sae, zs)
        if mode == "error":
            xh = xh + (x - tm.dense_decode(sae, z))
        return (xh,) + tuple(out[1:]) if isinstance(out, tuple) else xh

    h = tm.layer_module(m, 0).register_forward_hook(hook)
    try:
        y = logprob_y(m(ids.expand(nodes, -1)).logits)
        (weights * y).sum().backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    z = seen["z"][0]
    z0 = torch.zeros_like(z) if start is None else start[0]
    integral = seen["zs"].grad.sum(0)  # sum_i w_i dY/dz(path at alpha_i): the weights are in the objective
    y1 = dense_y(m, sae, ids[:1], mode, objective=logprob_y)
    y0 = dense_y(m, sae, ids[:1], mode, edit=lambda zz: zz * 0 + z0, objective=logprob_y)
    return (z - z0) * integral, float(y1[0]), float(y0[0])


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_ig_converges_to_dense_path_integral(mode):
    m, sae, tok, sc = setup("llama", mode=mode, seed=3)
    ids = ids_of(tok, TEXT)[None]
    ref, y1, y0 = dense_ig(m, sae, ids, mode=mode)
    errs = []
    for steps in (2, 8, 32):
        attr = sc.attribute(ids, objective="logprob", target=TARGET, method="ig", steps=steps)
        inf = attr.influence
        valid = inf.indices[0] >= 0
        got = torch.zeros_like(ref)
        got.scatter_add_(1, inf.indices[0].clamp(min=0), torch.where(valid, inf.scores[0], 0.0))
        errs.append(float((got - ref).abs().max()))
        assert abs(float(attr.objective[0]) - y1) <= 1e-12
    scale = float(ref.abs().max())
    assert scale > 0
    # the midpoint rule converges as 1/N^2: each 4x more steps cuts the error
    assert errs[1] < errs[0] and errs[2] < errs[1], errs
    assert errs[2] <= 1e-2 * scale, (errs, scale)
    # completeness: the IG scores add up to Y(z) - Y(0)
    assert abs(float(ref.sum()) - (y1 - y0)) <= 1e-6 * max(1.0, abs(y1 - y0))
    assert abs(float(got.sum()) - (y1 - y0)) <= 5e-3 * float(ref.abs().sum())


def test_ig_scores_reduce_and_bad_input():
    m, sae, tok, sc = setup("gpt2")
    res = sc.score(TEXT, method="ig", steps=4)
    assert res.method == "ig4" and bool((res.scores >= 0).all())
    with pytest.raises(InputError, match="method must be one of"):
        sc.score(TEXT, method="shap")
    with pytest.raises(InputError, match="steps must be"):
        sc.score(TEXT, method="ig", steps=0)
    with pytest.raises(InputError, match="score"):
        sc.attribute(TEXT, method="exact")


# ------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("mode", ["splice", "error"])
def test_exact_equals_rerun_with_latent_zeroed(mode):
    m, sae, tok, sc = setup("gpt2", mode=mode, seed=5)
    ids = ids_of(tok, TEXT)[None]
    first = sc.score(ids[0])
    lat = first.top(5, strict=False).tolist() + [int(torch.nonzero(~first.active)[0])]  # + one inactive latent
    ex = sc.score(ids[0], method="exact", latents=lat, sign="signed")
    assert ex.method == "exact"
    assert ex.evaluated.nonzero().flatten().tolist() == sorted(lat)
    y_clean = float(dense_y(m, sae, ids, mode)[0])
    assert abs(ex.objective - y_clean) <= 1e-12
    for j in lat:
        def edit(z, j=j):
            z = z.clone()
            z[..., j] = 0
            return z
        want = y_clean - float(dense_y(m, sae, ids, mode, edit=edit)[0])
        assert abs(float(ex.scores[j]) - want) <= 1e-10 * max(1.0, abs(want)), (j, float(ex.scores[j]), want)
    assert abs(float(ex.scores[lat[-1]])) <= 1e-12  # the inactive latent changes nothing
    assert any(float(ex.scores[j]) != 0 for j in lat[:-1])
    # Top-K of the exact result ranks the evaluated latents by their measured effect
    top = ex.top(3)
    assert set(top.tolist()) <= set(lat)
    assert bool((ex.scores[top][:-1] >= ex.scores[top][1:]).all())


def test_exact_batched_padded_and_budget():
    m, sae, _, _ = setup("llama", seed=7)
    m = m.float()
    sae = sae.to(dtype=torch.float32)
    tok = tm.tokenizer(padding_side="left")
    sc = GradSAE(m, sae, hook=HOOK, tokenizer=tok)
    texts = [TEXT, "answer : the river of fire"]
    ex = sc.score(texts, method="exact", latents=4, sign="signed")
    for text, got in zip(texts, ex):
        one = sc.score(text, method="exact", latents=4, sign="signed")
        assert torch.equal(got.evaluated, one.evaluated)
        close(got.scores, one.scores, 1e-4, atol=1e-6)
        ids = ids_of(tok, text)[None]
        for j in got.evaluated.nonzero().flatten().tolist():
            def edit(z, j=j):
                z = z.clone()
                z[..., j] = 0
                return z
            want = float(dense_y(m, sae, ids)[0] - dense_y(m, sae, ids, edit=edit)[0])
            assert abs(float(got.scores[j]) - want) <= 1e-4 * max(1e-2, abs(want))
    # many ablations in one forward give the same numbers as one per forward
    from gradsae.model.methods import ablation_effects

    ids, mask = sc.encode_batch(texts)
    lists = [e.evaluated.nonzero().flatten().tolist() for e in ex]
    y1, e1 = ablation_effects(sc, ids, mask, lists, "predicted_prob", -1, {}, tokens_per_forward=1)
    y2, e2 = ablation_effects(sc, ids, mask, lists, "predicted_prob", -1, {})
    for a, b in zip(e1, e2):
        close(a, b, 1e-4, atol=1e-6)
    # the budget keeps the first latents of each list
    with pytest.warns(GradSAEWarning, match="budget"):
        cut = sc.score(texts, method="exact", latents=4, budget=2, sign="signed")
    for c, full in zip(cut, ex):
        assert int(c.evaluated.sum()) == 2
    with pytest.raises(InputError, match="budget"):
        sc.score(TEXT, method="exact", budget=0)
    with pytest.raises(InputError, match=r"\[0, 96\)"):
        sc.score(TEXT, method="exact", latents=[3, 500])


# ------------------------------------------------------------------------------------ error node, baseline
def dense_run(m, sae, ids, mode, objective, edit=None):
    """One dense float64 forward/backward with the SAE spliced at layer 0 (``mode``; ``edit(z)``
    applied before the decode): returns the hook input x, dense z, dY/dz (retain_grad),
    D = dY/d(hook output) (retain_grad) and Y."""
    rec = {}

    def hook(mod, args, out):
        x = (out[0] if isinstance(out, tuple) else out).detach()
        z = tm.dense_encode(sae, x).requires_grad_(True)
        xh = tm.dense_decode(sae, z if edit is None else edit(z))
        if mode == "error":
            xh = xh + (x - tm.dense_decode(sae, z)).detach()
        xh.retain_grad()
        rec.update(x=x, z=z, out=xh)
        return (xh,) + tuple(out[1:]) if isinstance(out, tuple) else xh

    h = tm.layer_module(m, 0).register_forward_hook(hook)
    try:
        y = objective(m(ids).logits)
        y.sum().backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    return rec["x"], rec["z"].detach(), rec["z"].grad, rec["out"].grad, y.detach()


def per_token(inf, d_sae):
    """Dense ``[B, T, d_sae]`` of an Influence's scores (a latent's slots added)."""
    B, T, _ = inf.indices.shape
    out = torch.zeros(B, T, d_sae, dtype=torch.float64)
    valid = inf.indices >= 0
    out.scatter_add_(2, inf.indices.clamp(min=0), torch.where(valid, inf.scores.double(), 0.0))
    return out


def nll(logits, ids):
    return torch.stack([torch.nn.functional.cross_entropy(lg[:-1], t[1:]) for lg, t in zip(logits, ids)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_error_node_completes_the_chain_rule(arch):
    """Error mode: the hook's output is x = x_hat + e with x_hat = z @ W_dec + b_dec (no input
    normalisation) and e = x - x_hat. With D = dY/dx (the model's own forward, by float64
    autograd), the chain rule splits D . x exactly:

        error node (e . D)  +  sum over latents j of z_j * dY/dz_j  +  b_dec . D  ==  D . x

    per token, because dY/dz_j = W_dec[j] . D. The error node alone is e . D."""
    m, sae, tok, sc = setup(arch, mode="error", seed=11)
    ids = torch.randint(4, tm.VOCAB, (2, 7))
    attr = sc.attribute(ids, objective="loss")
    assert attr.error is not None and attr.error.shape == (2, 7)
    x, z, _, Dd, y = dense_run(m, sae, ids, "error", lambda lg: nll(lg, ids))
    close(attr.objective, y, 1e-12)
    lhs = attr.error.double() + per_token(attr.influence, sae.d_sae).sum(-1) + Dd @ sae.b_dec.double()
    rhs = (Dd * x).sum(-1)
    close(lhs, rhs, 1e-10, atol=1e-12)
    e = x - tm.dense_decode(sae, z)
    close(attr.error, (e * Dd).sum(-1), 1e-10, atol=1e-12)
    assert float(attr.error.abs().max()) > 0
    # reduced next to the latents: signed sum over positions; splice mode has no error node
    res = sc.reduce(attr, reduce="sum", sign="signed")
    for b in range(2):
        assert abs(res[b].error - float(attr.error[b].sum())) <= 1e-12 * max(1.0, abs(res[b].error))
    assert sc.attribute(ids, objective="loss", error_node=False).error is None
    assert GradSAE(m, sae, hook=HOOK, mode="splice").attribute(ids, objective="loss").error is None


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_counterfactual_baseline_equals_dense_recipe(mode):
    m, sae, tok, sc = setup("llama", mode=mode, seed=13)
    clean, corrupt = ids_of(tok, TEXT)[None], ids_of(tok, CORRUPT)[None]
    assert clean.shape == corrupt.shape
    pp = lambda lg: lg[:, -1].softmax(-1).max(-1).values  # noqa: E731
    xp, zp, _, _, _ = dense_run(m, sae, corrupt, mode, pp)
    x, z, g, Dd, y = dense_run(m, sae, clean, mode, pp)
    want = (z - zp) * g  # [1, T, d_sae]: attribution patching at the clean prompt
    attr = sc.attribute(TEXT, objective="predicted_prob", baseline=CORRUPT)
    assert attr.method == "grad-baseline"
    got = per_token(attr.influence, sae.d_sae)
    close(got, want, 1e-9, atol=1e-13)
    assert bool((want != 0).any())
    # no latent has two slots at one token
    for row in attr.influence.indices.reshape(-1, attr.influence.indices.shape[-1]):
        r = row[row >= 0]
        assert r.unique().numel() == r.numel()
    res = sc.score(TEXT, baseline=CORRUPT, reduce="sum", sign="signed")
    close(res.scores, want[0].sum(0), 1e-9, atol=1e-13)
    assert res.method == "grad-baseline" and abs(res.objective - float(y[0])) <= 1e-12
    if mode == "error":
        e_clean = x - tm.dense_decode(sae, z)
        e_corrupt = xp - tm.dense_decode(sae, zp)
        close(attr.error, ((e_clean - e_corrupt) * Dd).sum(-1), 1e-9, atol=1e-13)
    else:
        assert attr.error is None
    with pytest.raises(InputError, match="same number of prompts and of tokens"):
        sc.score(TEXT, baseline="the king")


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_ig_from_a_counterfactual_baseline_matches_dense_path_integral(mode):
    m, sae, tok, sc = setup("llama", mode=mode, seed=17)
    clean, corrupt = ids_of(tok, TEXT)[None], ids_of(tok, CORRUPT)[None]
    _, zp, _, _, _ = dense_run(m, sae, corrupt, mode, logprob_y)
    ref, y1, y0 = dense_ig(m, sae, clean, mode=mode, start=zp)
    attr = sc.attribute(clean, objective="logprob", target=TARGET, method="ig", steps=32, baseline=corrupt)
    assert attr.method == "ig32-baseline"
    got = per_token(attr.influence, sae.d_sae)[0]
    scale = float(ref.abs().max())
    assert scale > 0 and bool(((got != 0) & (ref != 0)).any())
    assert float((got - ref).abs().max()) <= 1e-2 * scale
    assert abs(float(ref.sum()) - (y1 - y0)) <= 1e-6 * max(1.0, abs(y1 - y0))
    assert abs(float(got.sum()) - (y1 - y0)) <= 5e-3 * float(ref.abs().sum())
    # one step from the corrupt prompt is attribution patching evaluated at the midpoint; the
    # slots are those of the first-order baseline result
    g = sc.attribute(clean, objective="logprob", target=TARGET, baseline=corrupt)
    assert torch.equal(g.influence.indices, attr.influence.indices)
    close(g.influence.acts, attr.influence.acts, 1e-12)


def test_exact_needs_one_objective_value_per_example():
    m, sae, tok, sc = setup("gpt2")
    with pytest.raises(InputError, match="one value per example"):
        sc.score(TEXT, method="exact", latents=3, objective=lambda lg, ids, mask: lg[:, -1, 3].sum())
    # a [batch] callable works, and equals the named objective it spells out
    fn = lambda lg, ids, mask: lg[:, -1].log_softmax(-1)[:, 5]  # noqa: E731
    a = sc.score(TEXT, method="exact", latents=3, objective=fn, sign="signed")
    b = sc.score(TEXT, method="exact", latents=3, objective="logprob", target=5, sign="signed")
    assert torch.equal(a.evaluated, b.evaluated)
    close(a.scores, b.scores, 1e-9, atol=1e-13)


def test_error_node_under_an_intervention_is_the_sae_error_term():
    """Inside intervene(zero=[j]) the hook's output is x_hat(z edited) + e with e = x - x_hat(z)
    of the unedited latents; the error node is e . D there."""
    m, sae, tok, sc = setup("llama", mode="error", seed=19)
    ids = torch.randint(4, tm.VOCAB, (1, 7))
    j = int(sc.score(ids[0], objective="loss").top(1)[0])

    def edit(z):
        z = z.clone()
        z[..., j] = 0
        return z

    x, z, _, Dd, _ = dense_run(m, sae, ids, "error", lambda lg: nll(lg, ids), edit=edit)
    with sc.intervene(zero=[j]):
        attr = sc.attribute(ids, objective="loss")
    e = x - tm.dense_decode(sae, z)
    close(attr.error, (e * Dd).sum(-1), 1e-10, atol=1e-12)


def test_method_results_keep_influences_and_influence_the_same():
    """``Attribution.influences`` (what corpus runs and reduce() of several hooks read) holds the
    method's influence, not the first-order one of an inner pass."""
    m = tm.model("gpt2", d=32, layers=2, seed=11, scale=3.0).double()
    sae = random_sae(32, 64, "topk", k=4, dtype=torch.float64, seed=12)
    scorer = GradSAE(m, sae, hook="blocks.1.hook_resid_post", mode="error", tokenizer=tm.tokenizer())
    for kw in (dict(method="ig", steps=2), dict(baseline="the queen of the south was"), {}):
        attr = scorer.attribute("the king of the north was", objective="loss", **kw)
        assert list(attr.influences) == ["blocks.1.hook_resid_post"]
        assert attr.influences["blocks.1.hook_resid_post"] is attr.influence
