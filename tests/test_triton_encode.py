"""The Triton backend's fused encode + select (and its influence) against the float64 oracle,
under TRITON_INTERPRET=1 on tiny shapes: every activation and SAE option, ragged token
counts, d_sae not a multiple of the tile, several d_sae splits merged, k edge cases, packed
indices above 2^16, threshold capacities and overflow, and low-precision inputs."""

import pytest
import torch
from oracle import (
    assert_matches_oracle,
    dense_oracle,
    max_errors,
    option_cases,
    random_inputs,
    random_sae,
    selection_tol,
)

import gradsae
from gradsae.errors import CapacityError
from gradsae.kernels import encode_threshold, encode_topk
from gradsae.kernels.topk import pack_keys, unpack_keys

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = option_cases((7, 5, 1, 13, 64))


def _inputs(lead, d_in, dtype=torch.float32, scale=2.0):
    return random_inputs(lead, d_in, DEV, dtype, scale)


@pytest.mark.parametrize("activation,rescale,normalize,apply_b_dec,k", CASES)
@pytest.mark.parametrize("lead", [(11,), (2, 21)])  # 42 rows: a ragged second row block
def test_influence_matches_oracle(activation, rescale, normalize, apply_b_dec, k, lead):
    d_in, d_sae = 24, 150  # d_sae spans 3 splits, the last one partial
    sae = random_sae(d_in, d_sae, activation, k=k or 8, normalize=normalize, rescale=rescale,
                     apply_b_dec=apply_b_dec, device=DEV, scalar_threshold=activation == "batchtopk")
    x, g = _inputs(lead, d_in)
    out = gradsae.influence(x, g, sae, backend="triton")
    assert out.indices.shape[:-1] == lead
    orc = dense_oracle(sae, x, g)
    if activation == "topk":
        assert out.K == k
    else:  # exactly sized: the fullest row
        assert out.K == max(1, int((orc["z"] != 0).sum(-1).max()))
    assert_matches_oracle(out, orc, sae, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.scores, out.acts * out.grads)


@pytest.mark.parametrize("d_sae,k", [(150, 3), (150, 150), (300, 256), (1, 1), (97, 97), (64, 64)])
def test_topk_k_edge_cases(d_sae, k):
    """k=1, k non power of two, k equal to d_sae, k = 256, d_sae = 1 (k > d_sae is refused
    when the SAE is built: tests/test_sae.py)."""
    d_in = 16
    sae = random_sae(d_in, d_sae, "topk", k=k, rescale=d_sae % 2 == 0, device=DEV)
    x, g = _inputs((9,), d_in)
    out = gradsae.influence(x, g, sae, backend="triton")
    assert out.K == k
    assert_matches_oracle(out, dense_oracle(sae, x, g), sae, atol=2e-4, rtol=2e-4)


def test_topk_values_descending_and_empty_slots():
    """Slots come in descending order of activation; non-positive winners are empty (-1, 0)."""
    sae = random_sae(8, 40, "topk", k=30, device=DEV)
    x, g = _inputs((6,), 8)
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    assert bool((acts[:, :-1] >= acts[:, 1:]).all())
    assert bool(((idx >= 0) == (acts > 0)).all())
    z = dense_oracle(sae, x, g)["z"]
    assert torch.equal((idx >= 0).sum(-1).cpu(), (z > 0).sum(-1))


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_indices_above_16_bits(activation):
    """d_sae ~ 70000: packed keys and compacted slots carry indices beyond 2^16."""
    d_in, d_sae = 4, 70001
    sae = random_sae(d_in, d_sae, activation, k=5, device=DEV)
    if activation == "jumprelu":
        sae.threshold += 10.0  # keep rows sparse (a few dozen active)
    high = torch.tensor([65537, 69999, d_sae - 1], device=DEV)
    sae.b_enc[high] += 40.0  # these latents win every row, beyond 16 bits
    sae._cache.clear()
    x, g = _inputs((2,), d_in, scale=3.0)
    out = gradsae.influence(x, g, sae, backend="triton")
    orc = dense_oracle(sae, x, g)
    assert_matches_oracle(out, orc, sae, atol=2e-4, rtol=2e-4)
    for row in out.indices.cpu():
        assert set(high.tolist()) <= set(row.tolist())


def assert_exact_topk(acts, idx, exact, k, tol=1e-4):
    """A float32 top-k equals the float64 one: the same index set wherever the k-th and
    (k+1)-th values are more than ``tol`` apart (docs/design.md, "How we test"), the kernel's
    values equal the exact values of the latents it picked, and its sorted values equal the
    exact top-k."""
    acts, idx = acts.cpu().double(), idx.cpu()
    want = exact.cpu().topk(min(k + 1, exact.shape[-1]))
    kth = want.values[:, k - 1]
    nxt = want.values[:, k] if want.values.shape[-1] > k else torch.full_like(kth, float("-inf"))
    clear = ((kth - nxt) > tol) & (kth.abs() > tol)
    valid = idx >= 0
    for r in range(idx.shape[0]):
        if bool(clear[r]):
            assert set(idx[r][valid[r]].tolist()) == set(want.indices[r, :k][want.values[r, :k] > 0].tolist()), r
    torch.testing.assert_close(torch.where(valid, acts, 0.0),
                               torch.where(valid, exact.cpu().gather(1, idx.clamp(min=0)), 0.0), atol=tol, rtol=tol)
    torch.testing.assert_close(acts.sort(-1, descending=True).values, want.values[:, :k].clamp(min=0),
                               atol=tol, rtol=tol)


def test_topk_splits_and_ragged_tiles_agree():
    """The same top-k whatever the number of d_sae splits merged by the second stage."""
    d_in, d_sae, k = 12, 333, 9
    sae = random_sae(d_in, d_sae, "topk", k=k, device=DEV)
    x, _ = _inputs((37,), d_in)
    a = x.to(sae.dtype)
    bias = (sae.b_enc.double() - sae.b_dec.double() @ sae.W_enc.double()).float()
    exact = a.double() @ sae.W_enc.double() + bias.double()
    for splits in (1, 2, 6):
        acts, idx = encode_topk(a, sae.W_enc, bias, k, n_splits=splits)
        assert_exact_topk(acts, idx, exact, k)


@triton.jit
def _pack(V, I, OUT, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(OUT + o, pack_keys(tl.load(V + o), tl.load(I + o)))


def test_unpack_keys_round_trip_order():
    """Packed keys order like (value, -index) and unpack to the exact value and index."""
    vals = torch.tensor([-3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, -1e30, 7.25], device=DEV)
    idx = torch.tensor([5, 1, 2, 70000, 9, 3, (1 << 21) - 1, 0], dtype=torch.int32, device=DEV)
    keys = torch.empty(8, dtype=torch.int64, device=DEV)
    _pack[(1,)](vals, idx, keys, N=8)
    v, i = unpack_keys(keys)
    assert torch.equal(v, vals) and torch.equal(i, idx.long())
    order = keys.argsort(descending=True).cpu().tolist()
    assert order[:3] == [7, 5, 4]  # 7.25, then the 2.0 tie broken towards the lower index
    assert order[-2:] == [0, 6]


def test_threshold_counts_and_overflow_detected():
    """Counts are exact even past the capacity, so overflow is never silent."""
    d_in, d_sae = 16, 200
    sae = random_sae(d_in, d_sae, "relu", device=DEV)
    x, g = _inputs((13,), d_in)
    bias = (sae.b_enc.double() - sae.b_dec.double() @ sae.W_enc.double()).float()
    thr = torch.zeros(d_sae, device=DEV)
    v = dense_oracle(sae, x, g)["v"]
    want = (v > 0).sum(-1)
    acts, idx, counts = encode_threshold(x, sae.W_enc, bias, thr, cap=10)
    assert torch.equal(counts.cpu(), want)
    assert bool((want > 10).any())
    assert bool(((idx >= 0).sum(-1).cpu() == want.clamp(max=10)).all())
    filled = idx.cpu() >= 0
    assert bool((v.gather(-1, idx.cpu().clamp(min=0))[filled] > 0).all())  # never a wrong latent


def test_threshold_capacity_error_and_padding():
    d_in, d_sae = 16, 120
    sae = random_sae(d_in, d_sae, "jumprelu", device=DEV)
    x, g = _inputs((7,), d_in)
    orc = dense_oracle(sae, x, g)
    counts = (orc["z"] != 0).sum(-1)
    fullest = int(counts.max())
    with pytest.raises(CapacityError, match=rf"token {int(counts.argmax())} has {fullest} active latents but the capacity is k={fullest - 1}; pass k>={fullest}"):
        gradsae.influence(x, g, sae, k=fullest - 1, backend="triton")
    out = gradsae.influence(x, g, sae, k=fullest + 3, backend="triton")
    assert out.K == fullest + 3
    assert_matches_oracle(out, orc, sae, atol=2e-4, rtol=2e-4)
    assert bool((out.indices[:, -3:] == -1).all())


def test_threshold_exact_sizing_retries_past_first_capacity():
    """k=None with rows fuller than the first pass's capacity: a second pass sizes exactly."""
    from gradsae.op import INITIAL_CAPACITY

    d_in, d_sae = 16, 2 * INITIAL_CAPACITY + 40
    sae = random_sae(d_in, d_sae, "relu", device=DEV)
    x, g = _inputs((5,), d_in)
    orc = dense_oracle(sae, x, g)
    fullest = int((orc["z"] != 0).sum(-1).max())
    assert fullest > INITIAL_CAPACITY
    out = gradsae.influence(x, g, sae, backend="triton")
    assert out.K == fullest
    assert_matches_oracle(out, orc, sae, atol=2e-4, rtol=2e-4)


def test_matches_reference_backend_and_deterministic_flag():
    sae = random_sae(20, 130, "jumprelu", device=DEV)
    x, g = _inputs((17,), 20)
    a = gradsae.influence(x, g, sae, backend="triton")
    b = gradsae.influence(x, g, sae, backend="triton", deterministic=True)
    r = gradsae.influence(x, g, sae, backend="reference")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    # both ascending by latent index; two float32 GEMMs may disagree only on a value within
    # rounding of its threshold, so rows holding one are compared through the oracle instead
    orc = dense_oracle(sae, x, g)
    near = ((orc["v"] - orc["thr"]).abs() < 1e-4).any(-1)
    assert torch.equal(a.indices.cpu()[~near], r.indices.cpu()[~near])
    assert_matches_oracle(a, orc, sae, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.scores[~near.to(a.scores.device)], r.scores[~near.to(r.scores.device)],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,rescale", [("topk", False), ("topk", True), ("jumprelu", False)])
def test_low_precision_within_twice_reference_error(dtype, activation, rescale):
    """fp32 accumulation from half-precision inputs: error vs the float64 oracle at most 2x
    the reference backend's in the same dtype (plus a small atol)."""
    d_in, d_sae = 64, 256
    sae = random_sae(d_in, d_sae, activation, k=16, rescale=rescale, dtype=dtype, device=DEV)
    x, g = _inputs((12,), d_in, dtype)
    orc = dense_oracle(sae, x, g)
    out = gradsae.influence(x, g, sae, backend="triton")
    ref = gradsae.influence(x, g, sae, backend="reference")
    assert out.acts.dtype == torch.float32
    e_t, e_r = max_errors(out, orc), max_errors(ref, orc)
    for f in ("acts", "grads", "scores"):
        assert e_t[f] <= 2 * e_r[f] + 1e-3, (f, e_t, e_r)
    # the selection itself is right up to half-precision ties
    assert_matches_oracle(out, orc, sae, atol=0.1, rtol=0.05, set_tol=max(0.1, selection_tol(sae, x, orc)))


@pytest.mark.parametrize("k", [7, 64])
def test_candidate_queue_and_per_tile_merge_agree(k):
    """The filtered candidate-queue path (flushes, and tiles that alone fill a queue) and the
    merge-every-tile path both give the exact top-k."""
    d_in, d_sae = 8, 1500
    W = torch.randn(d_in, d_sae, device=DEV)
    bias = torch.randn(d_sae, device=DEV)
    a = torch.randn(19, d_in, device=DEV)
    exact = a.double() @ W.double() + bias.double()
    for queue in (True, False):
        acts, idx = encode_topk(a, W, bias, k, queue=queue)
        assert_exact_topk(acts, idx, exact, k)
