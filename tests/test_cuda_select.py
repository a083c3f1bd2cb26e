"""Host-side tests of the CUDA selection/merge logic (csrc/select.cuh).

The header's functions are what the encode and merge kernels run; a host-only build
(csrc/select_host.cpp, compiled here with g++) runs them with the kernels' tiling, with one
worker and on a 32-lane warp emulated by threads (barriers for __syncwarp, a flag exchange
for __ballot_sync), and every result is compared with an independent Python computation on
fresh random inputs.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = str(tmp_path_factory.mktemp("select_host") / "select_host")
    subprocess.run(
        [cxx, "-O2", "-std=c++17", "-pthread", "-Wall", "-Wextra", "-Werror", "-I" + CSRC,
         os.path.join(CSRC, "select_host.cpp"), "-o", exe],
        check=True, capture_output=True,
    )

    def run(cmd: str, payload: bytes) -> bytes:
        res = subprocess.run([exe, cmd], input=payload, capture_output=True, check=True)
        return res.stdout

    return run


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def _i32(*vals) -> bytes:
    return struct.pack(f"<{len(vals)}i", *vals)


def _rank(v: float, j: int):
    """Descending order of the keys: larger value first, +0 before -0, then smaller index."""
    return (-v, math.copysign(1.0, v) < 0, j)


# ---------------------------------------------------------------------------- keys
def test_packed_keys_roundtrip_and_order(driver):
    rng = _rng()
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38,
                        1.0, -1.0, 1.0, 1.0], dtype=np.float32)
    v = np.concatenate([special, rng.standard_normal(500).astype(np.float32),
                        np.round(rng.standard_normal(200), 1).astype(np.float32)])  # many exact ties
    idx = rng.integers(0, 2**31, size=v.size).astype(np.uint32)
    idx[:5] = [0, 1, 2**32 - 2, 7, 7]
    n = v.size
    out = driver("keys", _i32(n) + v.tobytes() + idx.tobytes())
    keys = np.frombuffer(out[: 8 * n], dtype=np.uint64)
    back = np.frombuffer(out[8 * n: 12 * n], dtype=np.float32)
    bidx = np.frombuffer(out[12 * n:], dtype=np.uint32)

    nan = np.isnan(v)
    assert (keys[nan] == 0).all(), "NaN must map to the empty key"
    assert (keys[~nan] != 0).all(), "real values must never map to the empty key"
    # round trip: bit-exact values and indices
    assert (back[~nan].view(np.uint32) == v[~nan].view(np.uint32)).all()
    assert (bidx[~nan] == idx[~nan]).all()
    # descending key order == (value desc, +0 before -0, index asc)
    real = np.flatnonzero(~nan)
    by_key = sorted(real, key=lambda i: -int(keys[i]))
    by_val = sorted(real, key=lambda i: _rank(float(v[i]), int(idx[i])))
    assert [(float(v[i]), int(idx[i])) for i in by_key] == [(float(v[i]), int(idx[i])) for i in by_val]


# ---------------------------------------------------------------------------- sort network
@pytest.mark.parametrize("cmd", ["sort", "lanes"])
@pytest.mark.parametrize("n", [1, 2, 32, 64, 128, 256, 512])
def test_bitonic_sort_descending(driver, cmd, n):
    rng = _rng()
    keys = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    if n >= 4:
        keys[: n // 4] = keys[n // 4: n // 2]  # duplicates
        keys[-1] = 0
    out = np.frombuffer(driver(cmd, _i32(n) + keys.tobytes()), dtype=np.uint64)
    assert out.tolist() == sorted(keys.tolist(), reverse=True)


# ---------------------------------------------------------------------------- top-k pipeline
def _topk_expected(v: np.ndarray, thr: np.ndarray | None, k: int):
    rows, cols = v.shape
    t = np.zeros(cols, dtype=np.float32) if thr is None else thr
    idx = np.full((rows, k), -1, dtype=np.int64)
    val = np.zeros((rows, k), dtype=np.float32)
    for r in range(rows):
        cand = [(float(v[r, j]), j) for j in range(cols) if v[r, j] > t[j]]  # NaN never passes
        cand.sort(key=lambda c: _rank(c[0], c[1]))
        for s, (x, j) in enumerate(cand[:k]):
            idx[r, s], val[r, s] = j, x
    return idx, val


@pytest.mark.parametrize(
    "rows,cols,k,bn,split_cols,thr",
    [
        (6, 1000, 64, 128, 256, False),    # kernel tile width, several splits, ragged last tile
        (4, 4096, 256, 128, 1024, False),  # largest k, state wider than a tile
        (5, 777, 1, 32, 96, False),        # k=1, small tiles, ragged split
        (3, 300, 33, 64, 128, True),       # per-column thresholds, kp=64 > k
        (4, 50, 64, 128, 128, False),      # fewer positive columns than k: empty slots
        (8, 2000, 17, 128, 2048, False),   # one split
    ],
)
@pytest.mark.parametrize("cmd", ["topk", "topk32"])  # one worker / an emulated 32-lane warp
def test_topk_tiles_and_split_merge(driver, cmd, rows, cols, k, bn, split_cols, thr):
    rng = _rng()
    v = rng.standard_normal((rows, cols)).astype(np.float32)
    v[:, ::7] = np.round(v[:, ::7], 1)   # exact ties across tiles and splits
    v[0, ::11] = np.nan                  # NaN is never selected
    v[1, : cols // 3] = -np.abs(v[1, : cols // 3])
    v[-1, :] = np.abs(v[-1, :]) + 0.5    # every column positive: the k largest overall
    t = (rng.random(cols).astype(np.float32) * 0.5) if thr else None
    payload = _i32(rows, cols, k, bn, split_cols, int(thr)) + v.tobytes() + (t.tobytes() if thr else b"")
    out = driver(cmd, payload)
    idx = np.frombuffer(out[: 8 * rows * k], dtype=np.int64).reshape(rows, k)
    val = np.frombuffer(out[8 * rows * k:], dtype=np.float32).reshape(rows, k)
    want_idx, want_val = _topk_expected(v, t, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(val.view(np.uint32), want_val.view(np.uint32))


@pytest.mark.parametrize("cmd", ["topk", "topk32"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_topk_queue_flush_patterns(driver, cmd, order):
    """Ascending columns: every tile beats the state (the queue fills and is merged again and
    again); descending: after the first tile nothing enters."""
    rows, cols, k = 3, 2000, 64
    v = np.sort(np.abs(_rng().standard_normal((rows, cols))).astype(np.float32) + 0.01, axis=1)
    if order == "descending":
        v = v[:, ::-1].copy()
    out = driver(cmd, _i32(rows, cols, k, 128, 1024, 0) + v.tobytes())
    idx = np.frombuffer(out[: 8 * rows * k], dtype=np.int64).reshape(rows, k)
    want_idx, _ = _topk_expected(v, None, k)
    np.testing.assert_array_equal(idx, want_idx)


def test_topk_matches_torch_topk_without_ties(driver):
    """Against torch.topk on distinct values: the selected set and its descending order."""
    rows, cols, k = 7, 3000, 100
    v = torch.randn(rows, cols)
    payload = _i32(rows, cols, k, 128, 512, 0) + v.numpy().astype(np.float32).tobytes()
    out = driver("topk", payload)
    idx = torch.from_numpy(np.frombuffer(out[: 8 * rows * k], dtype=np.int64).reshape(rows, k).copy())
    top = v.topk(k, dim=-1)
    want = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1))
    assert torch.equal(idx, want)


# ---------------------------------------------------------------------------- threshold compaction
@pytest.mark.parametrize(
    "rows,cols,cap,bn,split_cols",
    [
        (6, 1000, 400, 128, 256),  # fits
        (6, 1000, 20, 128, 256),   # most rows overflow: counted past the capacity
        (5, 333, 7, 32, 64),       # small tiles, ragged
        (4, 4096, 64, 128, 4096),  # one split
    ],
)
@pytest.mark.parametrize("cmd", ["threshold", "threshold32"])
def test_threshold_compaction_with_capacity(driver, cmd, rows, cols, cap, bn, split_cols):
    rng = _rng()
    v = rng.standard_normal((rows, cols)).astype(np.float32)
    thr = np.maximum(rng.standard_normal(cols).astype(np.float32) + 0.8, 0).astype(np.float32)
    v[0, :5] = thr[:5]                 # equal to the threshold: not active (strict >)
    v[1, ::13] = np.nan
    v[2, :] = -1.0                     # an empty row
    payload = _i32(rows, cols, cap, bn, split_cols) + v.tobytes() + thr.tobytes()
    out = driver(cmd, payload)
    total = np.frombuffer(out[: 4 * rows], dtype=np.int32)
    idx = np.frombuffer(out[4 * rows: 4 * rows + 8 * rows * cap], dtype=np.int64).reshape(rows, cap)
    val = np.frombuffer(out[4 * rows + 8 * rows * cap:], dtype=np.float32).reshape(rows, cap)
    active = v > thr[None, :]
    np.testing.assert_array_equal(total, active.sum(1))
    for r in range(rows):
        cols_r = np.flatnonzero(active[r])[:cap]  # ascending latent order, first `cap` kept
        m = cols_r.size
        np.testing.assert_array_equal(idx[r, :m], cols_r)
        np.testing.assert_array_equal(val[r, :m].view(np.uint32), v[r, cols_r].view(np.uint32))
        assert (idx[r, m:] == -1).all() and (val[r, m:] == 0).all()
