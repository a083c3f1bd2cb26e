"""Triton gather-dot, influence_at, and the fused LatentStats accumulation (atomic and
deterministic) against the reference gather-dot, LatentStats.update and the float64 oracle."""

import pytest
import torch
from oracle import dense_oracle, random_sae

import gradsae
from gradsae.backends.reference import gather_dot as ref_gather_dot
from gradsae.kernels import gather_dot

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("K,d_in,idx_dtype", [(1, 8, torch.int64), (5, 200, torch.int32), (100, 33, torch.int64)])
@pytest.mark.parametrize("scales", [False, True])
def test_gather_dot_matches_float64(K, d_in, idx_dtype, scales):
    """Slot blocks (K > 64), d_in chunks (d_in > 128), empty slots, both scales."""
    n, d_sae = 7, 300
    W = torch.randn(d_sae, d_in, dtype=torch.float64)
    D = torch.randn(n, d_in, dtype=torch.float64)
    idx = torch.randint(0, d_sae, (n, K))
    idx[torch.rand(n, K) < 0.3] = -1
    rs = torch.rand(n, dtype=torch.float64) + 0.5 if scales else None
    cs = torch.rand(d_sae, dtype=torch.float64) + 0.5 if scales else None
    want = ref_gather_dot(W, idx, D, rs, cs)  # float64 reference
    f = lambda t: None if t is None else t.to(DEV, torch.float32)  # noqa: E731
    got = gather_dot(f(W), idx.to(DEV, idx_dtype), f(D), f(rs), f(cs))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-5)
    assert bool((got.cpu()[idx < 0] == 0).all())


@pytest.mark.parametrize("normalize,rescale", [("none", False), ("layer_norm", True), ("constant_norm_rescale", False)])
def test_influence_at_matches_oracle(normalize, rescale):
    sae = random_sae(24, 90, "topk", k=6, normalize=normalize, rescale=rescale, device=DEV)
    x = torch.randn(3, 4, 24, device=DEV) * 2
    g = torch.randn(3, 4, 24, device=DEV)
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    out = gradsae.influence_at(idx, acts, g, sae, x=x, backend="triton")
    orc = dense_oracle(sae, x, g)
    safe = idx.reshape(-1, 6).cpu().clamp(min=0)
    want = orc["g"].gather(-1, safe) * (idx.reshape(-1, 6).cpu() >= 0)
    torch.testing.assert_close(out.grads.reshape(-1, 6).cpu().double(), want, atol=2e-4, rtol=2e-4)


def _oracle_stats(sae, x, g, mask=None):
    """Per-latent sums straight from the dense float64 oracle."""
    orc = dense_oracle(sae, x, g)
    z, gg = orc["z"], orc["g"]
    if mask is not None:
        z, gg = z[mask.reshape(-1).cpu()], gg[mask.reshape(-1).cpu()]
    on = z != 0
    s = torch.where(on, z * gg, torch.zeros_like(z))
    return {
        "count": on.sum(0), "act_sum": z.sum(0), "score_sum": s.sum(0), "relu_sum": s.relu().sum(0),
        "abs_sum": s.abs().sum(0),
        "score_max": torch.where(on, s, torch.full_like(s, float("-inf"))).max(0).values,
    }


def _close_stats(st, want, atol):
    d = st.to_dict()
    assert torch.equal(d["count"].cpu(), want["count"])
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum", "score_max"):
        got, ref = d[f].cpu(), want[f]
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), f
        fin = ~torch.isinf(ref)
        torch.testing.assert_close(got[fin].double(), ref[fin], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("activation,normalize,rescale", [("topk", "none", True), ("jumprelu", "layer_norm", False)])
def test_fused_stats_match_update_and_oracle(deterministic, activation, normalize, rescale):
    sae = random_sae(20, 80, activation, k=5, normalize=normalize, rescale=rescale, device=DEV)
    x = torch.randn(2, 19, 20, device=DEV) * 2
    g = torch.randn(2, 19, 20, device=DEV)
    mask = torch.rand(2, 19, device=DEV) > 0.3
    fused = gradsae.accumulate_influence(x, g, sae, mask=mask, backend="triton", deterministic=deterministic)
    inf = gradsae.influence(x, g, sae, backend="triton")
    upd = gradsae.LatentStats(sae.d_sae, device=DEV).update(inf, mask)
    assert fused.tokens == upd.tokens == int(mask.sum())
    d_f, d_u = fused.to_dict(), upd.to_dict()
    assert torch.equal(d_f["count"], d_u["count"]) and torch.equal(d_f["score_max"], d_u["score_max"])
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum"):  # same terms, another order
        torch.testing.assert_close(d_f[f], d_u[f], atol=1e-9, rtol=1e-12)
    _close_stats(fused, _oracle_stats(sae, x, g, mask), atol=5e-4)


def test_deterministic_stats_bitwise_repeatable_and_accumulating():
    """Two runs give identical bits; a second call adds onto the first (stats on CPU in
    float32 take the temporary-tables-and-merge path on a GPU)."""
    sae = random_sae(16, 70, "jumprelu", device=DEV)
    x = torch.randn(23, 16, device=DEV) * 2
    g = torch.randn(23, 16, device=DEV)
    a = gradsae.accumulate_influence(x, g, sae, backend="triton", deterministic=True)
    b = gradsae.accumulate_influence(x, g, sae, backend="triton", deterministic=True)
    assert a == b
    gradsae.accumulate_influence(x, g, sae, a, backend="triton", deterministic=True)
    want = _oracle_stats(sae, x, g)
    doubled = {f: (t * 2 if f != "score_max" else t) for f, t in want.items()}
    _close_stats(a, doubled, atol=5e-4)
    assert a.tokens == 46
    c = gradsae.LatentStats(sae.d_sae, device="cpu", dtype=torch.float32)
    gradsae.accumulate_influence(x, g, sae, c, backend="triton", deterministic=True)
    _close_stats(c, want, atol=5e-4)


def test_accumulate_falls_back_to_update_for_backends_without_fusion():
    sae = random_sae(16, 50, "topk", k=4, device=DEV)
    x = torch.randn(9, 16, device=DEV)
    g = torch.randn(9, 16, device=DEV)
    st = gradsae.accumulate_influence(x, g, sae, backend="reference")
    upd = gradsae.LatentStats(sae.d_sae, device=DEV).update(gradsae.influence(x, g, sae, backend="reference"))
    assert st == upd


def test_accumulate_rejects_bad_mask_and_stats():
    sae = random_sae(8, 20, "topk", k=2, device=DEV)
    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(gradsae.InputError, match="mask has shape"):
        gradsae.accumulate_influence(x, x, sae, mask=torch.ones(4, dtype=torch.bool), backend="triton")
    with pytest.raises(gradsae.InputError, match="d_sae=21"):
        gradsae.accumulate_influence(x, x, sae, gradsae.LatentStats(21), backend="triton")
