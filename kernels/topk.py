"""Packed value/index keys for the streaming top-k, and the second-stage merge.

A key is one int64 whose signed order is the order of (value, -index):

    high 32 bits: the float32 value's bits, made order-preserving as a signed int
                  (negative floats have their 31 magnitude bits flipped)
    low 32 bits:  0x7FFFFFFF - index  (ties go to the lower latent index)

so a single sort / top-k / max carries both the value and the latent index, for indices up
to 2^31 - 1 (d_sae up to 2^21 and far beyond). ``EMPTY`` (int64 min) marks no candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

EMPTY = -(1 << 63)
EMPTY_KEY = tl.constexpr(EMPTY)  # the same, visible inside kernels
_LOW = 0x7FFFFFFF


@triton.jit
def pack_keys(v, cols):
    """int64 keys of float32 values ``v`` at latent indices ``cols`` (same shapes)."""
    b = v.to(tl.int32, bitcast=True)
    ordered = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


# The combine functions of tl.min / tl.max, used through tl.reduce directly: the same code on
# the GPU, and the interpreter recognises them (numpy fast path, no per-call patching).
_min_of = tl.standard._elementwise_min
_max_of = tl.standard._elementwise_max


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@constexpr_function
def _axis_shape(nd, ax):
    """Shape ``[1, .., 2, .., 1]`` of rank ``nd`` with the 2 on axis ``ax``."""
    return [1] * ax + [2] + [1] * (nd - ax - 1)


@triton.jit
def merge_running_topk(best, keys, KP: tl.constexpr):
    """Merge a tile of keys ``[BM, BN]`` (powers of two, BN >= KP) into the running
    top-``KP`` ``best`` ``[BM, KP]``, sorted descending; returns the new ``best``.

    A bitonic network on the tile viewed as a hypercube of 2s (rows on the leading axes):
    runs of KP are sorted in alternating directions; neighbouring runs are halved by an
    elementwise max (which keeps the KP largest of the pair as a bitonic run) and re-merged,
    until each row holds its KP largest in ascending order. Against ``best`` (descending) an
    elementwise max is again a bitonic run holding the KP largest of both, and one descending
    merge sorts it. Every compare-exchange is a min and a max over one size-2 axis, and the
    network is written out inline (device-function calls are free on the GPU but costly in
    the interpreter).
    """
    BM: tl.constexpr = keys.shape[0]
    BN: tl.constexpr = keys.shape[1]
    LOG_K: tl.constexpr = _log2(KP)
    LOG_N: tl.constexpr = _log2(BN)
    ND: tl.constexpr = _log2(BM * BN)
    h = tl.reshape(keys, [2] * ND)
    # (Axis numbers are written as expressions of constexprs: a plain local assignment would
    # turn them into runtime values.)
    # 1) sort runs of KP; the run holding position p goes descending when bit s of p is 1
    for s in tl.static_range(1, LOG_K + 1):
        if s < LOG_N:
            desc = tl.reshape(tl.arange(0, 2), _axis_shape(ND, ND - 1 - s))
        else:
            desc = tl.zeros([1] * ND, dtype=tl.int32)  # one run per row: ascending
        for i in tl.static_range(s):
            side = tl.reshape(tl.arange(0, 2), _axis_shape(ND, ND - s + i))
            lo = tl.reduce(h, ND - s + i, _min_of, keep_dims=True)
            hi = tl.reduce(h, ND - s + i, _max_of, keep_dims=True)
            h = tl.where((side ^ desc) != 0, hi, lo)
    # 2) halve: keep the larger of each pair of neighbouring runs, re-merge (rank ND - r + LOG_K)
    for r in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.reduce(h, ND - r, _max_of)
        if r < LOG_N:
            desc = tl.reshape(tl.arange(0, 2), _axis_shape(ND - r + LOG_K, ND - r - 1))
        else:
            desc = tl.zeros([1] * (ND - r + LOG_K), dtype=tl.int32)
        for i in tl.static_range(LOG_K):
            side = tl.reshape(tl.arange(0, 2), _axis_shape(ND - r + LOG_K, ND - r + i))
            lo = tl.reduce(h, ND - r + i, _min_of, keep_dims=True)
            hi = tl.reduce(h, ND - r + i, _max_of, keep_dims=True)
            h = tl.where((side ^ desc) != 0, hi, lo)
    # 3) merge into the running best, descending
    NB: tl.constexpr = _log2(BM * KP)
    c = tl.reshape(tl.maximum(best, tl.reshape(h, [BM, KP])), [2] * NB)
    for i in tl.static_range(LOG_K):
        side = tl.reshape(tl.arange(0, 2), _axis_shape(NB, NB - LOG_K + i))
        lo = tl.reduce(c, NB - LOG_K + i, _min_of, keep_dims=True)
        hi = tl.reduce(c, NB - LOG_K + i, _max_of, keep_dims=True)
        c = tl.where(side != 0, lo, hi)
    return tl.reshape(c, [BM, KP])


@triton.jit
def kth_bar(best, K, KP: tl.constexpr):
    """The bar of each row: the fp32 value of its K-th best key (``best`` sorted descending),
    at least 0; 0 while the row has fewer than K keys."""
    kk = tl.arange(0, KP)[None, :]
    kth = tl.min(tl.where(kk < K, best, 0x7FFFFFFFFFFFFFFF), axis=1)
    hi = (kth >> 32).to(tl.int32)
    val = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return tl.where(kth == EMPTY_KEY, 0.0, tl.maximum(val, 0.0))


@triton.jit
def merge_queue(best, qbase, qn, KP: tl.constexpr, QC: tl.constexpr, QSTRIDE: tl.constexpr):
    """``best`` merged with the first ``qn`` keys of every row's queue (row r at
    ``qbase + r * QSTRIDE``), QC at a time. Barriers on both sides: other threads of the
    program wrote the queue, and will write it again once it is merged."""
    BM: tl.constexpr = best.shape[0]
    tl.debug_barrier()
    chunk = tl.arange(0, QC)[None, :]
    rows = tl.arange(0, BM)[:, None] * QSTRIDE
    for q0 in range(0, tl.max(qn, axis=0), QC):
        q = tl.load(qbase + rows + q0 + chunk, mask=(q0 + chunk) < qn[:, None], other=EMPTY_KEY)
        best = merge_running_topk(best, q, KP)
    tl.debug_barrier()
    return best


@triton.jit
def queue_hits(v, cols, bar, qbase, qn, QSTRIDE: tl.constexpr):
    """Append the keys of the tile's values above their row's bar to the row's queue (row r
    at ``qbase + r * QSTRIDE``, in column order); returns the new queue lengths. Keys are
    packed for the hits alone; positions are int32 offsets from the scalar base (a [BM, BN]
    tile of 64-bit addresses would cost registers the GEMM needs)."""
    BM: tl.constexpr = v.shape[0]
    BN: tl.constexpr = v.shape[1]
    hit = v > bar[:, None]
    hit_i = hit.to(tl.int32)
    pos = tl.cumsum(hit_i, axis=1) - 1 + qn[:, None] + tl.arange(0, BM)[:, None] * QSTRIDE
    tl.store(qbase + pos, pack_keys(v, cols[None, :] + tl.zeros([BM, BN], dtype=tl.int32)), mask=hit)
    return qn + tl.sum(hit_i, axis=1)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 indices) of packed keys; empty keys give value 0, index -1."""
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & _LOW)
    vals = bits.view(torch.float32)
    idx = _LOW - (keys & 0xFFFFFFFF)
    empty = keys == EMPTY
    return torch.where(empty, torch.zeros_like(vals), vals), torch.where(empty, torch.full_like(idx, -1), idx)


def merge_partials(partials: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second stage: the top-``k`` of per-split partial keys ``[N, S, KP]``.

    Returns ``(acts, indices)``, ``[N, k]``, in descending order of the selection value, with
    the TopK activation applied (``relu``; slots whose value is not positive are empty: index
    -1, act 0), exactly as the reference backend reports them. Keys are unique (they carry
    the index), so the result does not depend on the order of the partials.
    """
    n = partials.shape[0]
    flat = partials.reshape(n, -1)
    top = flat.topk(k, dim=1, sorted=True).values if k < flat.shape[1] else flat.sort(dim=1, descending=True).values
    vals, idx = unpack_keys(top)
    acts = vals.clamp(min=0)
    idx = torch.where(acts > 0, idx, torch.full_like(idx, -1))
    acts = torch.where(idx >= 0, acts, torch.zeros_like(acts))
    return acts, idx
