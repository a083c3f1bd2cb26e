"""Many SAEs in one forward and one backward (GradSAE(model, {hook: sae}) / a list), against
independent float64 computations: error mode vs one single-SAE run per hook; splice mode vs a
dense autograd run of the model with every SAE spliced (dense z, retain_grad), written here;
interventions {hook: latents} vs hand-written dense hooks."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import InputError
from gradsae.model import GradSAE
from gradsae.stats import LatentStats

D = 32


def _saes(seed=0):
    """Three SAEs of different kinds at three hooks of a 2-layer model (the module found by
    hand in the dense recipes: layer 0's output, layer 1's input, layer 1's output)."""
    return {
        "blocks.0.hook_resid_post": random_sae(D, 96, "topk", k=6, dtype=torch.float64, seed=seed + 1),
        "blocks.1.hook_resid_pre": random_sae(D, 80, "jumprelu", dtype=torch.float64, seed=seed + 2,
                                              normalize="layer_norm"),
        "blocks.1.hook_resid_post": random_sae(D, 64, "topk", k=5, dtype=torch.float64, seed=seed + 3,
                                               normalize="constant_norm_rescale", rescale=True),
    }


def _ids(B=2, T=7):
    return torch.randint(4, tm.VOCAB, (B, T))


def _dense(inf, d_sae, what="scores"):
    """``[B, T, d_sae]`` from an Influence's slots."""
    idx = inf.indices
    out = torch.zeros(*idx.shape[:-1], d_sae + 1, dtype=torch.float64)
    out.scatter_add_(-1, torch.where(idx >= 0, idx, d_sae), getattr(inf, what).double())
    return out[..., :d_sae]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_error_mode_equals_one_run_per_sae(arch):
    m = tm.model(arch, d=D, scale=3.0).double()
    saes = _saes()
    tok = tm.tokenizer(padding_side="right")  # float64 eager attention: NaN in fully masked rows on the left
    texts = ["the king of the north was red", "what river is blue ?"]
    multi = GradSAE(m, saes, mode="error", tokenizer=tok)
    stats = {h: LatentStats(s.d_sae) for h, s in saes.items()}
    attr = multi.attribute(texts, objective="loss", stats=stats)
    assert list(attr.influences) == list(saes)
    assert attr.influence is attr.influences["blocks.0.hook_resid_post"]
    scores = multi.score(texts, objective="predicted_prob")
    assert list(scores) == list(saes)
    for h, sae in saes.items():
        one = GradSAE(m, sae, hook=h, mode="error", tokenizer=tok)
        one_stats = LatentStats(sae.d_sae)
        ref = one.attribute(texts, objective="loss", stats=one_stats)
        got = attr.influences[h]
        assert torch.equal(got.indices, ref.influence.indices)
        for f in ("acts", "grads", "scores"):
            assert torch.allclose(getattr(got, f), getattr(ref.influence, f), rtol=1e-12, atol=1e-14), f
        assert torch.allclose(stats[h].score_sum, one_stats.score_sum, rtol=1e-12, atol=1e-14)
        assert torch.equal(stats[h].count, one_stats.count)
        assert bool((got.scores != 0).any()), "degenerate example: nothing to compare"
        ref_scores = one.score(texts, objective="predicted_prob")
        for a, b in zip(scores[h], ref_scores):
            assert torch.allclose(a.scores, b.scores, rtol=1e-12, atol=1e-14)
            assert a.active_last.tolist() == b.active_last.tolist()


def _modules(m, hook):
    """(module, "output"|"input") of a hook, found by hand."""
    layer = int(hook.split(".")[1])
    return tm.layer_module(m, layer), ("input" if hook.endswith("resid_pre") else "output")


def dense_spliced_run(m, saes, ids, mode="splice", edits=None):
    """Every SAE spliced densely (z = sae.encode(x) with x not detached, z.retain_grad(), the
    hook's value replaced by decode(z) (+ the detached error in error mode)); the loss of every
    example summed, backward. Returns ({hook: dense influence z.grad * z [B, T, d_sae]}, logits)."""
    zs, handles = {}, []
    edits = edits or {}

    def replace(hook, sae, x):
        z = sae.encode(x)
        if not z.requires_grad:  # the first hook: nothing below it needs a gradient
            z.requires_grad_(True)
        z.retain_grad()
        zs[hook] = z
        z2 = edits[hook](z) if hook in edits else z
        out = sae.decode(z2, x)
        if mode == "error":
            out = out + (x - sae.decode(z, x)).detach()
        return out

    for hook, sae in saes.items():
        mod, kind = _modules(m, hook)
        if kind == "output":
            def fn(mod, args, out, hook=hook, sae=sae):
                x = out[0] if isinstance(out, tuple) else out
                y = replace(hook, sae, x)
                return (y, *out[1:]) if isinstance(out, tuple) else y
            handles.append(mod.register_forward_hook(fn))
        else:
            def pre(mod, args, kwargs, hook=hook, sae=sae):
                if args:
                    return (replace(hook, sae, args[0]), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = replace(hook, sae, kwargs["hidden_states"])
                return args, kwargs
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.enable_grad():
            # the embedding output needs no gradient: freeze the model as GradSAE does
            for p in m.parameters():
                p.requires_grad_(False)
            logits = m(ids).logits
            loss = torch.stack([torch.nn.functional.cross_entropy(lg[:-1], t[1:]) for lg, t in zip(logits, ids)]).sum()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in m.parameters():
            p.requires_grad_(True)
    return {h: (z.grad * z).detach() for h, z in zs.items()}, logits.detach()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_splice_mode_equals_dense_recipe_with_all_saes_spliced(arch):
    m = tm.model(arch, d=D, scale=3.0).double()
    saes = _saes(seed=3)
    ids = _ids()
    sc = GradSAE(m, list(saes.values()), hooks=list(saes), mode="splice")
    attr = sc.attribute(ids, objective="loss", keep_logits=True)
    ref, logits = dense_spliced_run(m, saes, ids)
    assert torch.allclose(attr.logits, logits, rtol=0, atol=1e-10)
    for h, sae in saes.items():
        got = _dense(attr.influences[h], sae.d_sae)
        scale = ref[h].abs().max().item()
        assert scale > 0, "degenerate example: nothing to compare"
        assert (got - ref[h]).abs().max().item() <= 1e-9 * scale, h
    # the earlier SAEs' gradients pass through the later SAEs: without that path they differ
    first = _dense(attr.influences["blocks.0.hook_resid_post"], saes["blocks.0.hook_resid_post"].d_sae)
    alone = GradSAE(m, saes["blocks.0.hook_resid_post"], hook="blocks.0.hook_resid_post").attribute(ids, objective="loss")
    assert not torch.allclose(first, _dense(alone.influence, saes["blocks.0.hook_resid_post"].d_sae))


def test_padded_batch_equals_each_text_alone_in_splice_mode():
    # float32 (HF's eager attention leaves NaN in fully masked rows in float64); pad rows must
    # not leak into the gradient that passes through the later SAEs' encoders
    m = tm.model("llama", d=D, scale=3.0)
    saes = {h: s.to(dtype=torch.float32) for h, s in _saes(seed=7).items()}
    tok = tm.tokenizer(padding_side="right")
    texts = ["the king of the north was red", "what river is blue ?", "a queen"]
    sc = GradSAE(m, saes, tokenizer=tok)
    batch = sc.score(texts, objective="loss")
    for i, text in enumerate(texts):
        one = sc.score(text, objective="loss")
        for h in saes:
            got, want = batch[h][i].scores, one[h].scores
            assert bool(torch.isfinite(got).all())
            assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1e-30), h


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_intervene_per_hook_equals_dense_hooks(mode):
    m = tm.model("llama", d=D, scale=3.0).double()
    saes = _saes(seed=5)
    ids = _ids()
    sc = GradSAE(m, saes, mode=mode)
    # latents active somewhere at each edited hook (from the dense recipe's own z)
    ref, _ = dense_spliced_run(m, saes, ids, mode=mode)
    a, b = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    za = torch.argsort((ref[a] != 0).sum((0, 1)), descending=True)[:2].tolist()
    zb = torch.argsort((ref[b] != 0).sum((0, 1)), descending=True)[:1].tolist()

    def zero(J):
        def f(z):
            z = z.clone()
            z[..., J] = 0
            return z
        return f

    _, want = dense_spliced_run(m, saes, ids, mode=mode, edits={a: zero(za), b: zero(zb)})
    with torch.no_grad():
        plain = m(ids).logits
    with sc.intervene({a: za, b: zb}) as ivs:
        with torch.no_grad():
            got = m(ids).logits
    assert set(ivs) == {a, b}
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(got, plain)
    with torch.no_grad():
        after = m(ids).logits
    assert torch.allclose(after, plain, rtol=0, atol=0)  # nothing left attached


def test_bad_multi_arguments():
    m = tm.model("gpt2", d=D).double()
    saes = _saes()
    lst = list(saes.values())
    with pytest.raises(InputError, match="hooks="):
        GradSAE(m, lst, hooks=["blocks.0.hook_resid_post"])
    with pytest.raises(InputError, match="name no hook"):
        GradSAE(m, lst)
    with pytest.raises(InputError, match="more than one SAE"):
        GradSAE(m, lst[:2], hooks=["blocks.0.hook_resid_post"] * 2)
    with pytest.raises(InputError, match="empty"):
        GradSAE(m, {})
    with pytest.raises(InputError, match="mapping names its hooks"):
        GradSAE(m, saes, hook="blocks.0.hook_resid_post")
    sc = GradSAE(m, saes)
    with pytest.raises(InputError, match="several SAEs takes zero"):
        with sc.intervene([1, 2]):
            pass
    with pytest.raises(InputError, match="no SAE"):
        with sc.intervene({"blocks.0.hook_mlp_out": [1]}):
            pass
    with pytest.raises(InputError, match="stats"):
        sc.attribute(_ids(), stats=LatentStats(96))


def test_generation_runs_with_every_sae_in_place():
    m = tm.model("llama", d=D, scale=3.0).double()
    saes = _saes(seed=9)
    sc = GradSAE(m, saes, tokenizer=tm.tokenizer())
    ids = _ids(1, 5)[0]
    gen = sc.generate(ids, max_new_tokens=3, use_cache=False, stop_ids=[])
    # the same greedy steps written out, the model running on every SAE's dense reconstruction
    seq = ids.clone()
    for _ in range(3):
        zs, handles = {}, []
        for h, sae in saes.items():
            mod, kind = _modules(m, h)
            if kind == "output":
                handles.append(mod.register_forward_hook(
                    lambda mod, a, o, sae=sae: (sae.decode(sae.encode(o[0]), o[0]), *o[1:]) if isinstance(o, tuple)
                    else sae.decode(sae.encode(o), o)))
            else:
                handles.append(mod.register_forward_pre_hook(
                    lambda mod, a, kw, sae=sae: ((sae.decode(sae.encode(a[0]), a[0]), *a[1:]), kw) if a
                    else (a, {**kw, "hidden_states": sae.decode(sae.encode(kw["hidden_states"]), kw["hidden_states"])}),
                    with_kwargs=True))
        try:
            with torch.no_grad():
                nxt = m(seq[None]).logits[0, -1].argmax()
        finally:
            for hd in handles:
                hd.remove()
        seq = torch.cat([seq, nxt[None]])
    assert gen.token_ids.tolist() == seq[len(ids):].tolist()
