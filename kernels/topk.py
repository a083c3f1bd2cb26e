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
_LOW = 0x7FFFFFFF


@triton.jit
def pack_keys(v, cols):
    """int64 keys of float32 values ``v`` at latent indices ``cols`` (same shapes)."""
    b = v.to(tl.int32, bitcast=True)
    ordered = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.jit
def _side(n_dims: tl.constexpr, axis: tl.constexpr):
    """0 for the first, 1 for the second element along hypercube ``axis`` (broadcastable)."""
    return tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (n_dims - axis - 1))


@triton.jit
def _exchange(h, desc, axis: tl.constexpr, n_dims: tl.constexpr):
    """Compare-exchange the pairs along hypercube ``axis``: the pair's min goes first where
    ``desc`` is 0, second where it is 1 (``desc`` broadcasts against ``h``)."""
    lo = tl.min(h, axis=axis, keep_dims=True)
    hi = tl.max(h, axis=axis, keep_dims=True)
    return tl.where((_side(n_dims, axis) ^ desc) != 0, hi, lo)


@triton.jit
def _merge_runs(h, run_log: tl.constexpr, desc, n_dims: tl.constexpr):
    """Bitonic merge of every run of 2^run_log elements of the hypercube ``h`` (rows along
    its last axes): strides 2^(run_log-1) down to 1."""
    for i in tl.static_range(run_log):
        h = _exchange(h, desc, n_dims - run_log + i, n_dims)
    return h


@triton.jit
def bitonic_topk(keys, KP: tl.constexpr, DESC: tl.constexpr):
    """The ``KP`` largest of each row of ``keys`` ``[BM, BN]`` (powers of two, BN >= KP),
    sorted descending (``DESC``) or ascending.

    A bitonic network on the tensor viewed as a hypercube of 2s: runs of KP are sorted with
    alternating directions; then neighbouring runs are halved by an elementwise max (which
    keeps the KP largest of the pair as a bitonic run) and re-merged, until one run is left.
    Every compare-exchange is a min and a max over one size-2 axis.
    """
    BM: tl.constexpr = keys.shape[0]
    BN: tl.constexpr = keys.shape[1]
    LOG_K: tl.constexpr = _log2(KP)
    LOG_N: tl.constexpr = _log2(BN)
    ND: tl.constexpr = _log2(BM * BN)
    h = tl.reshape(keys, [2] * ND)
    for s in tl.static_range(1, LOG_K + 1):
        if s < LOG_N:
            h = _merge_runs(h, s, _side(ND, ND - 1 - s), ND)
        else:
            h = _merge_runs(h, s, DESC, ND)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=ND - (i - LOG_K) - LOG_K, keep_dims=False)
        nd_now: tl.constexpr = ND - (i - LOG_K)
        if i < LOG_N:
            h = _merge_runs(h, LOG_K, _side(nd_now, nd_now - 1 - LOG_K), nd_now)
        else:
            h = _merge_runs(h, LOG_K, DESC, nd_now)
    return tl.reshape(h, [BM, KP])


@triton.jit
def merge_running_topk(best, keys, KP: tl.constexpr):
    """Merge a tile of keys ``[BM, BN]`` into the running top-``KP`` ``best`` ``[BM, KP]``
    (sorted descending). The tile's top-KP in ascending order against ``best`` gives, by an
    elementwise max, a bitonic run holding the KP largest of both; one merge sorts it."""
    BM: tl.constexpr = best.shape[0]
    ND: tl.constexpr = _log2(BM * KP)
    LOG_K: tl.constexpr = _log2(KP)
    top = bitonic_topk(keys, KP, 0)
    cand = tl.reshape(tl.maximum(best, top), [2] * ND)
    return tl.reshape(_merge_runs(cand, LOG_K, 1, ND), [BM, KP])


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
