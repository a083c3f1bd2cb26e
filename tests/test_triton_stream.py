"""The chunked strategy with the Triton streaming selection (kernels/stream_select.py), under
TRITON_INTERPRET=1 on tiny shapes, against the float64 oracle: top-k and threshold SAEs with
every option, several chunks and row blocks, the queue's merge paths, ties, low precision,
exact overflow counts, and the NaN rule (a NaN pre-activation is never selected)."""

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, option_cases, random_inputs, random_sae, selection_tol

import gradsae
from gradsae.backends import chunked
from gradsae.op import Influence

triton = pytest.importorskip("triton")
from gradsae.kernels import gather_dot, stream_select  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CASES = option_cases((7, 5, 1, 13, 64))


def _encoder_input(sae, x):
    """(encoder input, fp32 bias, row_scale) as the kernel backends build them: b_dec folded
    into the bias where there is no normalisation."""
    if sae.normalize_activations == "none":
        bias = sae.b_enc.double()
        if sae.apply_b_dec_to_input:
            bias = bias - sae.b_dec.double() @ sae.W_enc.double()
        return x.to(sae.dtype), bias.float(), None
    a, state = sae.preprocess(x)
    return a, sae.b_enc.float(), state.row_scale


def chunked_influence(sae, x, g, k=None, budget=None, out_dtype=None, kernels=None):
    """Influence through the chunked strategy: streaming selection (``kernels``: the Triton
    folds by default) + the gather-dot."""
    kernels = kernels or stream_select
    x2, g2 = x.reshape(-1, sae.d_in), g.reshape(-1, sae.d_in)
    a, bias, row_scale = _encoder_input(sae, x2)
    dec_norm = sae.decoder_norm().float() if sae.rescale_acts_by_decoder_norm else None
    if sae.activation == "topk":
        acts, idx = chunked.topk(a, sae.W_enc, bias, k or sae.k, dec_norm, kernels, budget=budget,
                                 out_dtype=out_dtype)
    else:
        thr = sae.selection_threshold().float()
        acts, idx, counts = chunked.threshold(a, sae.W_enc, bias, thr, sae.d_sae, dec_norm, kernels,
                                              budget=budget, out_dtype=out_dtype)
        K = max(1, int(counts.max()))
        acts, idx = acts[:, :K], idx[:, :K]
    grads = gather_dot(sae.W_dec, idx, g2, row_scale, sae.col_scale())
    lead = x.shape[:-1]
    sh = lambda t: t.reshape(*lead, t.shape[-1])  # noqa: E731
    return Influence(sh(idx), sh(acts), sh(grads), sh(acts * grads), sae.d_sae)


@pytest.mark.parametrize("activation,rescale,normalize,apply_b_dec,k", CASES)
def test_chunked_influence_matches_oracle(activation, rescale, normalize, apply_b_dec, k):
    d_in, d_sae = 24, 700
    sae = random_sae(d_in, d_sae, activation, k=k or 8, normalize=normalize, rescale=rescale,
                     apply_b_dec=apply_b_dec, device=DEV, scalar_threshold=activation == "batchtopk")
    x, g = random_inputs((2, 9), d_in, DEV)
    # 18 rows x 256 columns of fp32 per chunk: three chunks, the last one partial
    out = chunked_influence(sae, x, g, budget=18 * 256 * 4)
    orc = dense_oracle(sae, x, g)
    if activation == "topk":
        assert out.K == k
    else:
        assert out.K == max(1, int((orc["z"] != 0).sum(-1).max()))
    assert_matches_oracle(out, orc, sae, atol=2e-4, rtol=2e-4)


def test_plan_respects_budget_and_granule():
    assert chunked.plan(8192, 131072, 2, 256 << 20) == (8192, 16384)
    assert chunked.plan(8192, 131072, 4, 256 << 20) == (8192, 8192)
    assert chunked.plan(10, 500, 4, 1 << 30) == (10, 500)        # all of d_sae in one chunk
    assert chunked.plan(18, 700, 4, 18 * 256 * 4) == (18, 256)   # three chunks, the last partial
    rows, cols = chunked.plan(1 << 20, 131072, 2, 256 << 20)     # too many rows: row blocks
    assert cols == 1024 and rows * cols * 2 <= 256 << 20
    for n, d, b in ((18, 700, 18 * 256 * 4), (1000, 70001, 5 << 20), (7, 3000, 100)):
        rows, cols = chunked.plan(n, d, 4, b)
        assert cols == d or cols % chunked.COL_GRANULE == 0
        assert rows * cols * 4 <= b or rows == 1


def _exact(P, bias, scale):
    v = P.double()
    if bias is not None:
        v = v + bias.double()
    if scale is not None:
        v = v * scale.double()
    return v


def _fp32(P, bias, scale):
    """The selection values as the kernel forms them: one fp32 add, then one fp32 multiply.
    Which latents win is decided on these (float64 can order two values 1 ulp apart the other
    way), the values returned are checked against float64."""
    v = P.float()
    if bias is not None:
        v = v + bias.float()
    if scale is not None:
        v = v * scale.float()
    return v


def _assert_topk(acts, idx, v, k, key=None):
    """Exact top-k of positive values with ties to the lower index, the order decided on
    ``key`` (the kernel's fp32 values; default ``v``) and the values checked against ``v``."""
    key = v if key is None else key
    n, d = v.shape
    for r in range(n):
        cand = sorted(((-float(key[r, j]), j) for j in range(d) if key[r, j] > 0))[:k]
        want = [j for _, j in cand]
        got = [int(j) for j in idx[r] if j >= 0]
        assert got == want, r
        torch.testing.assert_close(acts[r, : len(got)].double(), v[r, got], atol=1e-5, rtol=1e-5)
        assert bool((idx[r, len(got):] == -1).all()) and bool((acts[r, len(got):] == 0).all())


@pytest.mark.parametrize("config", [None, {"BM": 2, "BN": 512, "num_warps": 1}, {"BM": 8, "BN": 64, "num_warps": 1}])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_fold_paths(config, k):
    """Small tiles (the queue fills and is merged mid-chunk), wide tiles (more hits than the
    queue holds: the tile is merged whole), many chunks; ties broken to the lower index."""
    n, d = 9, 1300
    P = torch.randn(n, d, device=DEV)
    P[:, ::5] = torch.round(P[:, ::5] * 4) / 4      # exact ties, also across chunks
    P[2] = torch.linspace(-1, 3, d)                  # ascending: every tile beats the bar
    P[3] = -P[3].abs()                               # nothing positive: all slots empty
    bias, scale = torch.randn(d, device=DEV) * 0.1, None
    if k == 5:
        scale = torch.rand(d, device=DEV) + 0.5
    sel = stream_select.StreamTopK(n, k, DEV, bias, scale, config=config)
    for c0 in range(0, d, 300):
        sel.fold(P[:, c0:c0 + 300], c0)
    acts, idx = sel.result()
    _assert_topk(acts.cpu(), idx.cpu(), _exact(P, bias, scale).cpu(), k, key=_fp32(P, bias, scale).cpu())


def test_chunks_must_ascend():
    sel = stream_select.StreamTopK(2, 3, DEV)
    sel.fold(torch.randn(2, 10, device=DEV), 10)
    with pytest.raises(ValueError, match="ascending"):
        sel.fold(torch.randn(2, 10, device=DEV), 0)


@pytest.mark.parametrize("cap", [3, 500])
def test_threshold_fold_counts_exactly_and_keeps_order(cap):
    n, d = 11, 900
    P = torch.randn(n, d, device=DEV)
    thr = (torch.rand(d, device=DEV) * 0.5).clamp(min=0)
    P[0, :7] = thr[:7]                     # equal to the threshold: not active (strict >)
    P[1] = -5.0                            # an empty row
    bias = torch.randn(d, device=DEV) * 0.1
    sel = stream_select.StreamThreshold(n, cap, thr, DEV, bias, None)
    for c0 in range(0, d, 256):
        sel.fold(P[:, c0:c0 + 256], c0)
    acts, idx, counts = (t.cpu() for t in sel.result())
    v = _exact(P, bias, None).cpu()
    active = _fp32(P, bias, None).cpu() > thr.cpu()      # decided in fp32, as the kernel does
    assert torch.equal(counts, active.sum(-1))
    for r in range(n):
        cols = active[r].nonzero().flatten()[:cap]
        m = cols.numel()
        assert torch.equal(idx[r, :m], cols)
        torch.testing.assert_close(acts[r, :m].double(), v[r, cols], atol=1e-6, rtol=1e-6)
        assert bool((idx[r, m:] == -1).all()) and bool((acts[r, m:] == 0).all())


def test_row_blocks_and_one_chunk_agree():
    """A budget that forces blocks of rows gives the same selection as one big chunk."""
    d_in, d_sae, k = 8, 1100, 6
    sae = random_sae(d_in, d_sae, "topk", k=k, device=DEV)
    x, g = random_inputs((37,), d_in, DEV)
    small = chunked_influence(sae, x, g, budget=1024 * 4 * 5)   # 5 rows x 1024 columns a block
    assert chunked.plan(37, d_sae, 4, 1024 * 4 * 5) == (5, 1024)
    big = chunked_influence(sae, x, g, budget=1 << 30)
    assert torch.equal(small.indices, big.indices)
    torch.testing.assert_close(small.acts, big.acts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,rescale,out_dtype", [("topk", False, None), ("topk", True, "float32"),
                                                         ("jumprelu", False, None)])
def test_low_precision_within_twice_reference_error(dtype, activation, rescale, out_dtype):
    """16-bit inputs, chunk written in 16 bits (the GEMM's native output) or fp32: error vs
    the float64 oracle at most 2x the reference backend's in the same dtype."""
    d_in, d_sae = 64, 600
    sae = random_sae(d_in, d_sae, activation, k=16, rescale=rescale, dtype=dtype, device=DEV)
    x, g = random_inputs((12,), d_in, DEV, dtype)
    orc = dense_oracle(sae, x, g)
    out = chunked_influence(sae, x, g, budget=12 * 256 * 2, out_dtype=out_dtype)
    ref = gradsae.influence(x, g, sae, backend="reference")
    e_c, e_r = max_errors(out, orc), max_errors(ref, orc)
    for f in ("acts", "grads", "scores"):
        assert e_c[f] <= 2 * e_r[f] + 1e-3, (f, e_c, e_r)
    assert_matches_oracle(out, orc, sae, atol=0.1, rtol=0.05, set_tol=max(0.1, selection_tol(sae, x, orc)))


def test_nan_is_never_selected():
    """NaN pre-activations (NaN weights, or check_finite=False) are never selected, in top-k
    and threshold mode alike, and never displace a real value."""
    n, d, k = 5, 300, 4
    P = torch.randn(n, d, device=DEV)
    P[0, ::3] = float("nan")
    P[1, :] = float("nan")
    P[2, 7] = float("inf")
    sel = stream_select.StreamTopK(n, k, DEV)
    sel.fold(P[:, :128], 0)
    sel.fold(P[:, 128:], 128)
    acts, idx = (t.cpu() for t in sel.result())
    v = torch.nan_to_num(P.cpu().double(), nan=float("-inf"), posinf=float("inf"))
    _assert_topk(acts, idx, v, k)
    assert bool((idx[1] == -1).all())
    assert int(idx[2, 0]) == 7 and acts[2, 0] == float("inf")
    thr = torch.zeros(d, device=DEV)
    th = stream_select.StreamThreshold(n, d, thr, DEV)
    th.fold(P, 0)
    _, tidx, counts = (t.cpu() for t in th.result())
    assert torch.equal(counts, (v > 0).sum(-1))
    assert not bool(torch.isnan(P.cpu()[0].gather(0, tidx[0][tidx[0] >= 0])).any())
