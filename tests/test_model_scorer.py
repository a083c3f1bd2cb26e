"""GradSAE on tiny random transformers vs an independent dense reproduction of the paper's
recipe (tests/tiny_models.paper_scores), splice and error modes, batches, padding."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import InputError
from gradsae.model import GradSAE

D = 32
PROMPTS = [
    "the question is what king was in the north",
    "answer : the river of fire",
    "please organize your final answer in this format",
]


def setup(arch, activation="topk", dtype=torch.float64, seed=0, d_sae=96, k=6):
    m = tm.model(arch, d=D, scale=3.0, seed=seed).to(dtype)
    sae = random_sae(D, d_sae, activation, k=k, dtype=dtype, seed=seed + 1)
    return m, sae, tm.tokenizer()


def ids_of(tok, text):
    return tok(text, return_tensors="pt")["input_ids"][0]


def assert_close(a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_scores_match_paper_recipe(arch, layer):
    m, sae, tok = setup(arch, seed=layer)
    sc = GradSAE(m, sae, hook=f"blocks.{layer}.hook_resid_post", tokenizer=tok)
    for text in PROMPTS[:2]:
        ref, z, y = tm.paper_scores(m, sae, layer, ids_of(tok, text))
        got = sc.score(text)
        assert abs(got.objective - y) <= 1e-10
        assert_close(got.scores, ref, 1e-9)
        assert bool((ref > 0).any()), "degenerate example: nothing to compare"
        # latents active at the last position, and anywhere
        assert got.active_last.tolist() == torch.nonzero(z[-1]).flatten().tolist()
        assert torch.equal(got.active, (z != 0).any(0))
        assert_close(got.last_acts, z[-1], 1e-12)
        assert_close(got.mean_acts, z.mean(0), 1e-12)


def _ref_top(ref, active, n):
    order = torch.argsort(ref[active], descending=True, stable=True)
    return torch.nonzero(active).flatten()[order[:n]]


def _ref_bottom(ref, n):
    nz = torch.nonzero(ref).flatten()
    return nz[torch.argsort(ref[nz], stable=True)[:n]]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_top_bottom_match_paper_selection(arch):
    m, sae, tok = setup(arch, d_sae=128, k=12)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    text = PROMPTS[0]
    ref, z, _ = tm.paper_scores(m, sae, 0, ids_of(tok, text))
    got = sc.score(text)
    n_last = int((z[-1] != 0).sum())
    half = n_last // 2  # the paper's top_k
    assert got.resolve_k(0.5) == half
    nz = int((ref != 0).sum())
    for K in (1, 3, 0.5):
        n = got.resolve_k(K)
        top = got.top(K, strict=False)
        want = _ref_top(ref, (z != 0).any(0), n)
        assert torch.allclose(got.scores[top], ref[want], rtol=1e-9, atol=0)
        bot = got.bottom(K, strict=False)
        wantb = _ref_bottom(ref, n)
        assert len(bot) == min(n, nz)
        assert torch.allclose(got.scores[bot], ref[wantb], rtol=1e-9, atol=0)
        assert bool((got.scores[bot] > 0).all())
    # descending / ascending
    t = got.top(3)
    assert bool((got.scores[t][:-1] >= got.scores[t][1:]).all())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_error_mode_keeps_forward_and_matches_recipe(arch):
    m, sae, tok = setup(arch)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", mode="error", tokenizer=tok)
    ids = ids_of(tok, PROMPTS[0])
    ref, _, _y = tm.paper_scores(m, sae, 0, ids, mode="error")
    with torch.no_grad():
        plain = m(ids[None]).logits
    attr = sc.attribute(ids, objective="predicted_prob")
    assert attr.logits is None  # the head ran at the last position only
    assert torch.allclose(sc.attribute(ids, objective="predicted_prob", keep_logits=True).logits, plain,
                          rtol=0, atol=1e-12)
    got = sc.reduce(attr)[0]
    assert_close(got.scores, ref, 1e-9)
    # splice mode differs from error mode on the same input
    sp = GradSAE(m, sae, hook="blocks.0.hook_resid_post", mode="splice", tokenizer=tok)
    assert not torch.allclose(sp.attribute(ids, objective="predicted_prob", keep_logits=True).logits, plain)


@pytest.mark.parametrize("sign", ["signed", "abs"])
@pytest.mark.parametrize("reduce", ["sum", "last"])
def test_variants_match_recipe(sign, reduce):
    m, sae, tok = setup("llama")
    sc = GradSAE(m, sae, hook="blocks.1.hook_resid_post", tokenizer=tok)
    ids = ids_of(tok, PROMPTS[1])
    ref, _, _ = tm.paper_scores(m, sae, 1, ids, reduce=reduce, sign=sign)
    got = sc.score(ids, reduce=reduce, sign=sign)
    assert_close(got.scores, ref, 1e-9)


def _objectives(tok):
    t, a, b = 7, 9, 11
    return {
        "loss": ({}, lambda lg, ids: torch.nn.functional.cross_entropy(lg[:-1], ids[1:])),
        "logprob": ({"target": t}, lambda lg, ids: lg[-1].log_softmax(-1)[t]),
        "logit_diff": ({"a": a, "b": b}, lambda lg, ids: lg[-1, a] - lg[-1, b]),
    }


@pytest.mark.parametrize("objective", ["loss", "logprob", "logit_diff", "callable"])
def test_objectives_match_recipe(objective):
    m, sae, tok = setup("gpt2")
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    ids = ids_of(tok, PROMPTS[0])
    if objective == "callable":
        kw, fn = {}, (lambda lg, ids_: lg[-2].softmax(-1)[5])
        obj = lambda logits, input_ids, mask: logits[:, -2].softmax(-1)[:, 5]
    else:
        kw, fn = _objectives(tok)[objective]
        obj = objective
    ref, _, y = tm.paper_scores(m, sae, 0, ids, objective=lambda lg: fn(lg, ids), sign="signed")
    got = sc.score(ids, objective=obj, sign="signed", **kw)
    assert abs(got.objective - y) <= 1e-9 * max(1.0, abs(y))
    assert_close(got.scores, ref, 1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_padding_equals_single(arch, side):
    # float32: HF's eager attention leaves NaN in fully masked (pad) rows in float64
    m, sae, _ = setup(arch, dtype=torch.float32)
    tok = tm.tokenizer(padding_side=side)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    for objective in ("predicted_prob", "loss"):
        batch = sc.score(PROMPTS, objective=objective)
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        assert not bool(enc["attention_mask"].all()), "the batch must be padded"
        for text, got in zip(PROMPTS, batch):
            one = sc.score(text, objective=objective)
            assert_close(got.scores, one.scores, 1e-4)
            assert got.active_last.tolist() == one.active_last.tolist()
            assert torch.equal(got.active, one.active)
        # per-token influence: padded slots are empty
        attr = sc.attribute(PROMPTS, objective=objective)
        pad = ~attr.mask
        assert bool((attr.influence.indices[pad] == -1).all())
        assert bool((attr.influence.scores[pad] == 0).all())


def test_callable_objective_returning_a_scalar_sums_the_batch():
    m, sae, tok = setup("gpt2")
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    batch = sc.score(PROMPTS[:2], objective=lambda lg, ids, mask: lg[:, 0, 3].sum())
    singles = [sc.score(t, objective=lambda lg, ids, mask: lg[:, 0, 3].sum()) for t in PROMPTS[:2]]
    for b, s in zip(batch, singles):
        assert_close(b.scores, s.scores, 1e-9)
    assert batch[0].objective == batch[1].objective


def test_float32_close_to_float64_recipe():
    m, sae, tok = setup("llama", dtype=torch.float32)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    ids = ids_of(tok, PROMPTS[0])
    got = sc.score(ids)
    ref, _, _ = tm.paper_scores(m.double(), sae.to(dtype=torch.float64), 0, ids)
    assert_close(got.scores, ref, 1e-3)


def test_no_parameter_gradients_and_backward_stops_at_hook():
    m, sae, tok = setup("gpt2")
    called = []
    below = m.transformer.h[0].register_full_backward_hook(lambda *a: called.append(1))
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    sc = GradSAE(m, sae, hook="blocks.1.hook_resid_post", tokenizer=tok)
    sc.score(PROMPTS[0])
    below.remove()
    assert called == []
    assert all(p.grad is None for p in m.parameters())
    assert flags == {n: p.requires_grad for n, p in m.named_parameters()}
    # the model is left unspliced
    assert not m.transformer.h[1]._forward_hooks


def test_jumprelu_sae_matches_recipe():
    m, sae, tok = setup("gemma2", activation="jumprelu", d_sae=64)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    ids = ids_of(tok, PROMPTS[2])
    ref, z, _ = tm.paper_scores(m, sae, 0, ids)
    assert bool((z != 0).any())
    assert_close(sc.score(ids).scores, ref, 1e-9)


def test_bad_inputs():
    m, sae, tok = setup("gpt2")
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    res = sc.score(PROMPTS[0])
    with pytest.raises(InputError, match="larger than"):
        res.top(int(res.active.sum()) + 1)
    with pytest.raises(InputError, match="larger than"):
        res.bottom(int((res.scores != 0).sum()) + 1)
    with pytest.raises(InputError, match="fraction"):
        res.top(1.5)
    with pytest.raises(InputError, match="objective"):
        sc.score(PROMPTS[0], objective="nope")
    with pytest.raises(InputError, match="target"):
        sc.score(PROMPTS[0], objective="logprob")
    with pytest.raises(InputError, match="takes no argument"):
        sc.score(PROMPTS[0], objective="predicted_prob", target=3)
    with pytest.raises(InputError, match="reduce"):
        sc.score(PROMPTS[0], reduce="median")
    with pytest.raises(InputError, match="tokenizer"):
        GradSAE(m, sae, hook="blocks.0.hook_resid_post").score("the king")
    with pytest.raises(InputError, match="position"):
        sc.score("the king", position=5)
    with pytest.raises(InputError, match="different lengths"):
        sc.score([[5, 6, 7], [5, 6]])
    with pytest.raises(InputError, match="no real tokens"):
        sc.score(torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(InputError, match="mode"):
        GradSAE(m, sae, hook="blocks.0.hook_resid_post", mode="replace")


@pytest.mark.parametrize("normalize,rescale", [("constant_norm_rescale", True), ("layer_norm", False)])
def test_normalising_sae_matches_float64_oracle(normalize, rescale):
    from oracle import assert_matches_oracle, dense_oracle

    m = tm.model("llama", d=D, scale=3.0).double()
    sae = random_sae(D, 96, "topk", k=6, normalize=normalize, rescale=rescale, dtype=torch.float64)
    ids = torch.randint(4, tm.VOCAB, (2, 7))
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post")
    attr = sc.attribute(ids, objective="loss")
    # dense run: the hook output is the SAE's dense reconstruction of the detached input;
    # D = dY/d(hook output) from autograd, then the float64 oracle gives every dY/dz
    seen = {}

    def hook(mod, args, out):
        x = (out[0] if isinstance(out, tuple) else out).detach()
        y = sae.decode(sae.encode(x), x).requires_grad_(True)
        y.retain_grad()
        seen["x"], seen["y"] = x, y
        return (y, *out[1:]) if isinstance(out, tuple) else y

    h = m.model.layers[0].register_forward_hook(hook)
    try:
        logits = m(ids).logits
        loss = torch.stack([torch.nn.functional.cross_entropy(lg[:-1], t[1:]) for lg, t in zip(logits, ids)]).sum()
        loss.backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    assert torch.allclose(sc.attribute(ids, objective="loss", keep_logits=True).logits, logits.detach(), atol=1e-10)
    assert torch.allclose(attr.objective.sum(), loss.detach(), rtol=1e-12, atol=0)
    orc = dense_oracle(sae, seen["x"], seen["y"].grad)
    assert_matches_oracle(attr.influence, orc, sae, atol=1e-9, rtol=1e-7)


# the attention output projection of layer L, written out per architecture (independently of
# gradsae's hook resolution): its input is hook_z with the heads flattened
Z_PROJ = {
    "gpt2": lambda m, L: m.transformer.h[L].attn.c_proj,
    "llama": lambda m, L: m.model.layers[L].self_attn.o_proj,
    "gpt_neox": lambda m, L: m.gpt_neox.layers[L].attention.dense,
    "gemma2": lambda m, L: m.model.layers[L].self_attn.o_proj,
    "qwen3": lambda m, L: m.model.layers[L].self_attn.o_proj,
}


@pytest.mark.parametrize("arch", sorted(Z_PROJ))
def test_hook_z_scores_match_dense_recipe(arch):
    m, sae, tok = setup(arch)
    layer = 1
    ids = ids_of(tok, PROMPTS[1])
    zs = []

    def pre(mod, args):
        z = tm.dense_encode(sae, args[0].detach()).requires_grad_(True)
        z.retain_grad()
        zs.append(z)
        return (tm.dense_decode(sae, z),) + tuple(args[1:])

    h = Z_PROJ[arch](m, layer).register_forward_pre_hook(pre)
    try:
        m(ids[None]).logits[0, -1].softmax(-1).max().backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    ref = (zs[0].grad * zs[0])[0].relu().mean(0).detach()
    assert ref.abs().max() > 0
    got = GradSAE(m, sae, hook=f"blocks.{layer}.attn.hook_z", tokenizer=tok).score(ids, objective="predicted_prob")
    assert_close(got.scores, ref, 1e-9)
