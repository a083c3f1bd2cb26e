"""The reference backend against the float64 dense-autograd oracle, for every activation and
option, with chunking forced so the memory-bounded paths (running top-k, threshold
compaction across d_sae chunks, row sub-chunks of the gather-dot) are all exercised."""

import itertools

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, option_cases, random_sae

import gradsae
from gradsae.backends import get_backend
from gradsae.backends.reference import DEFAULT_BUDGET


@pytest.fixture
def small_budget():
    """Force tiny chunks: several token chunks, several d_sae chunks, gather sub-chunks."""
    ref = get_backend("reference")
    old = ref.budget
    ref.budget = 300
    yield
    ref.budget = old


CASES = option_cases((7, 7, 1, 13, 64))


@pytest.mark.parametrize("activation,rescale,normalize,apply_b_dec,k", CASES)
@pytest.mark.parametrize("lead", [(11,), (2, 5), (1,)])
def test_matches_oracle_float64(small_budget, activation, rescale, normalize, apply_b_dec, k, lead):
    d_in, d_sae = 24, 150
    sae = random_sae(
        d_in, d_sae, activation, k=k or 8, normalize=normalize, rescale=rescale,
        apply_b_dec=apply_b_dec, dtype=torch.float64, scalar_threshold=activation == "batchtopk",
    )
    x = torch.randn(*lead, d_in, dtype=torch.float64) * 2
    g = torch.randn(*lead, d_in, dtype=torch.float64)
    out = gradsae.influence(x, g, sae, backend="reference")
    assert out.indices.shape[:-1] == lead
    if activation == "topk":
        assert out.K == min(k, d_sae)
    orc = dense_oracle(sae, x, g)
    assert_matches_oracle(out, orc, sae, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.scores, out.acts * out.grads)


def test_default_budget_matches_small_budget():
    """Chunking must not change results: one block vs many blocks, bitwise on float64."""
    sae = random_sae(16, 300, "topk", k=9, dtype=torch.float64)
    x = torch.randn(40, 16, dtype=torch.float64)
    g = torch.randn(40, 16, dtype=torch.float64)
    ref = get_backend("reference")
    a = gradsae.influence(x, g, sae).canonical()
    ref.budget = 200
    try:
        b = gradsae.influence(x, g, sae).canonical()
    finally:
        ref.budget = DEFAULT_BUDGET
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_low_precision_error_is_bounded(dtype, activation):
    """Low-precision inputs: results are reported in float32 and stay close to the oracle."""
    d_in, d_sae = 64, 512
    sae = random_sae(d_in, d_sae, activation, k=16, dtype=dtype)
    x = (torch.randn(32, d_in) * 2).to(dtype)
    g = torch.randn(32, d_in).to(dtype)
    out = gradsae.influence(x, g, sae)
    assert out.acts.dtype == torch.float32 and out.scores.dtype == torch.float32
    orc = dense_oracle(sae, x, g)
    eps = torch.finfo(dtype).eps
    tol = {"acts": 40 * eps, "grads": 40 * eps}
    err = max_errors(out, orc)
    scale_a = float(orc["v"].abs().max())
    scale_g = float(orc["g"].abs().max())
    assert err["acts"] <= tol["acts"] * scale_a * 8, err
    assert err["grads"] <= tol["grads"] * scale_g * 8, err
    # the selected latents are the oracle's where selection is unambiguous at this precision
    assert_matches_oracle(out, orc, sae, atol=scale_a * 64 * eps + scale_g * 64 * eps,
                          rtol=0.05, set_tol=scale_a * 64 * eps)


def test_topk_negative_values_leave_empty_slots():
    """A TopK row whose k-th value is negative has fewer active latents: those slots are -1."""
    d_in, d_sae = 8, 20
    sae = random_sae(d_in, d_sae, "topk", k=6, dtype=torch.float64)
    sae.b_enc -= 1000.0  # every pre-activation negative except a forced few
    sae.b_enc[[3, 17]] = 2000.0
    sae._cache.clear()
    x = torch.randn(4, d_in, dtype=torch.float64)
    out = gradsae.influence(x, torch.randn_like(x), sae).canonical()
    assert out.indices[:, :2].tolist() == [[3, 17]] * 4
    assert bool((out.indices[:, 2:] == -1).all())
    assert bool((out.scores[:, 2:] == 0).all())


def test_threshold_capacity_overflow_names_the_fix():
    sae = random_sae(16, 200, "relu", dtype=torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    full = gradsae.influence(x, torch.randn_like(x), sae)  # k=None: sized to the fullest row
    need = int((full.indices >= 0).sum(-1).max())
    assert full.K == need
    with pytest.raises(gradsae.CapacityError, match=rf"pass k>={need}"):
        gradsae.influence(x, torch.randn_like(x), sae, k=need - 1)
    ok = gradsae.influence(x, torch.randn_like(x), sae, k=need + 3)
    assert ok.K == need + 3
    assert bool((ok.indices[:, need:] == -1).all())


def test_influence_at_equals_influence():
    for act, norm in itertools.product(["topk", "jumprelu"], ["none", "layer_norm", "constant_norm_rescale"]):
        sae = random_sae(12, 90, act, k=5, normalize=norm, rescale=act == "topk", dtype=torch.float64)
        x = torch.randn(3, 4, 12, dtype=torch.float64)
        g = torch.randn_like(x)
        idx, acts = gradsae.encode_sparse(x, sae)
        a = gradsae.influence_at(idx, acts, g, sae, x=x)
        b = gradsae.influence(x, g, sae)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=1e-12)


def test_to_dense_matches_oracle_scores():
    sae = random_sae(10, 40, "topk", k=4, dtype=torch.float64)
    x = torch.randn(5, 10, dtype=torch.float64)
    g = torch.randn_like(x)
    dense = gradsae.influence(x, g, sae).to_dense()
    orc = dense_oracle(sae, x, g)
    torch.testing.assert_close(dense, orc["z"] * orc["g"])


@pytest.mark.parametrize("cols", [7, 63, 256, 1000, 4096, 4099])
@pytest.mark.parametrize("K", [1, 5, 64])
def test_row_topk_equals_topk(cols, K):
    """The grouped prefilter returns torch.topk's values, and indices holding those values."""
    from gradsae.backends.reference import _row_topk

    K = min(K, cols)
    v = torch.randn(9, cols, dtype=torch.float64)
    v[0] = torch.arange(cols, dtype=torch.float64)        # increasing: top-K all in the last group slice
    v[1] = -torch.arange(cols, dtype=torch.float64)       # decreasing
    v[2, : cols // 2] = 5.0                               # many exact ties
    vals, idx = _row_topk(v, K)
    ref = v.topk(K, dim=-1)
    assert torch.equal(vals, ref.values)
    assert torch.equal(v.gather(1, idx), vals)
    assert bool((idx.sort(-1).values.diff(dim=-1) != 0).all()), "duplicate indices"
    untied = [r for r in range(9) if r != 2]
    assert torch.equal(idx[untied].sort(-1).values, ref.indices[untied].sort(-1).values)
