"""Host-side tests of the CUDA streaming selection (csrc/stream.cuh, the chunked strategy).

The host build of select_host.cpp runs the very functions the stream kernels run, chunk by
chunk and row by row, with one worker and on an emulated 32-lane warp, with and without
16-byte vector loads, on float32, float16 and bfloat16 chunks; every result is compared with
an independent NumPy computation (the same fp32 arithmetic, so bit for bit) on fresh random
inputs, including ties, NaN / inf, rows with nothing positive, and overflowing capacities.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_select import _i32, _rng, driver  # noqa: F401  (the compiled host driver fixture)

DTYPES = {0: "float32", 1: "float16", 2: "bfloat16"}


def _chunk_values(rng, rows, cols, dtype):
    """(payload bytes, the values as float32) of a random matrix in ``dtype``, with exact ties,
    NaN, +-inf and a row with nothing positive."""
    v = rng.standard_normal((rows, cols)).astype(np.float32) * 2
    v[:, ::5] = np.round(v[:, ::5] * 2) / 2                       # exact ties within and across chunks
    v[0, ::11] = np.nan
    v[1] = -np.abs(v[1])
    if rows > 3:
        v[3, 5] = np.inf
        v[3, 6] = -np.inf
    if dtype == 0:
        return v.tobytes(), v
    if dtype == 1:
        h = v.astype(np.float16)
        if rows > 2:
            h[2, :4] = np.array([6e-8, -6e-8, 1e-5, 65504], dtype=np.float16)  # subnormals, the largest half
        return h.view(np.uint16).tobytes(), h.astype(np.float32)
    bits = v.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
    rounded[np.isnan(v)] = 0x7FC0
    return rounded.tobytes(), (rounded.astype(np.uint32) << 16).view(np.float32)


def _selection_values(P, bias, scale):
    v = P.copy()
    with np.errstate(invalid="ignore"):
        if bias is not None:
            v = (v + bias[None, :]).astype(np.float32)
        if scale is not None:
            v = (v * scale[None, :]).astype(np.float32)
    return v


def _expected_topk(v, k):
    rows, cols = v.shape
    idx = np.full((rows, k), -1, dtype=np.int64)
    val = np.zeros((rows, k), dtype=np.float32)
    for r in range(rows):
        cand = sorted(((-float(v[r, j]), j) for j in range(cols) if v[r, j] > 0))[:k]  # NaN never passes
        for s, (neg, j) in enumerate(cand):
            idx[r, s], val[r, s] = j, -neg
    return idx, val


@pytest.mark.parametrize("dtype", [0, 1, 2], ids=lambda d: DTYPES[d])
@pytest.mark.parametrize(
    "rows,cols,k,chunk,bias,scale,vec",
    [
        (6, 1000, 64, 256, True, False, True),    # several chunks, vector loads
        (5, 1000, 64, 256, True, True, False),    # scalar loads, bias and decoder-norm scale
        (4, 3000, 256, 1024, False, True, True),  # the largest k
        (5, 777, 1, 200, True, False, True),      # k=1; chunk widths that forbid vector loads
        (4, 700, 37, 700, False, False, True),    # one chunk, kp = 64 > k
        (5, 45, 64, 16, True, False, True),       # fewer positive values than k: empty slots
    ],
)
@pytest.mark.parametrize("cmd", ["stream_topk", "stream_topk32"])
def test_stream_topk(driver, cmd, dtype, rows, cols, k, chunk, bias, scale, vec):  # noqa: F811
    rng = _rng()
    payload, P = _chunk_values(rng, rows, cols, dtype)
    b = (rng.standard_normal(cols).astype(np.float32) * 0.3) if bias else None
    s = (rng.random(cols).astype(np.float32) + 0.5) if scale else None
    head = _i32(rows, cols, k, chunk, dtype, int(bias), int(scale), int(vec))
    out = driver(cmd, head + payload + (b.tobytes() if bias else b"") + (s.tobytes() if scale else b""))
    idx = np.frombuffer(out[: 8 * rows * k], dtype=np.int64).reshape(rows, k)
    val = np.frombuffer(out[8 * rows * k:], dtype=np.float32).reshape(rows, k)
    want_idx, want_val = _expected_topk(_selection_values(P, b, s), k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(val.view(np.uint32), want_val.view(np.uint32))


@pytest.mark.parametrize("cmd", ["stream_topk", "stream_topk32"])
def test_stream_topk_ascending_rows_merge_the_queue_often(driver, cmd):  # noqa: F811
    """Ascending values: every step beats the bar, so the queue fills and is merged again and
    again inside a chunk; descending: after the first step nothing enters."""
    rows, cols, k = 4, 3000, 64
    v = np.sort(np.abs(_rng().standard_normal((rows, cols))).astype(np.float32) + 0.01, axis=1)
    v[2:] = v[2:, ::-1]
    out = driver(cmd, _i32(rows, cols, k, 1024, 0, 0, 0, 1) + v.tobytes())
    idx = np.frombuffer(out[: 8 * rows * k], dtype=np.int64).reshape(rows, k)
    np.testing.assert_array_equal(idx, _expected_topk(v, k)[0])


@pytest.mark.parametrize("dtype", [0, 2], ids=lambda d: DTYPES[d])
@pytest.mark.parametrize("rows,cols,cap,chunk,vec", [(6, 1000, 400, 256, True), (6, 1000, 9, 256, True),
                                                     (5, 333, 20, 100, False), (4, 2048, 64, 2048, True)])
@pytest.mark.parametrize("cmd", ["stream_threshold", "stream_threshold32"])
def test_stream_threshold(driver, cmd, dtype, rows, cols, cap, chunk, vec):  # noqa: F811
    rng = _rng()
    payload, P = _chunk_values(rng, rows, cols, dtype)
    b = rng.standard_normal(cols).astype(np.float32) * 0.3
    thr = np.maximum(rng.standard_normal(cols).astype(np.float32) + 0.8, 0).astype(np.float32)
    v = _selection_values(P, b, None)
    v[2, :5] = thr[:5] if dtype == 0 else v[2, :5]          # equal to the threshold: not active
    if dtype == 0:
        P[2, :5] = thr[:5] - b[:5]
        payload = P.tobytes()
        v = _selection_values(P, b, None)
    out = driver(cmd, _i32(rows, cols, cap, chunk, dtype, 1, 0, int(vec)) + payload + b.tobytes() + thr.tobytes())
    total = np.frombuffer(out[: 4 * rows], dtype=np.int32)
    idx = np.frombuffer(out[4 * rows: 4 * rows + 8 * rows * cap], dtype=np.int64).reshape(rows, cap)
    val = np.frombuffer(out[4 * rows + 8 * rows * cap:], dtype=np.float32).reshape(rows, cap)
    with np.errstate(invalid="ignore"):
        active = v > thr[None, :]
    np.testing.assert_array_equal(total, active.sum(1))
    for r in range(rows):
        want = np.flatnonzero(active[r])[:cap]
        m = want.size
        np.testing.assert_array_equal(idx[r, :m], want)
        np.testing.assert_array_equal(val[r, :m].view(np.uint32), v[r, want].view(np.uint32))
        assert (idx[r, m:] == -1).all() and (val[r, m:] == 0).all()
