"""Streaming selection: fold one chunk of pre-activations into a running per-row selection.

The chunked strategy (:mod:`gradsae.chunked`) lets the vendor GEMM write the encode of one
chunk of latents, ``P = a @ W_enc[:, c0:c0+C]`` (``[T, C]``, fp32 or the inputs' 16-bit
type), and folds it here, in one read of the chunk, into

    v[r, c] = (P[r, c] + bias[c0 + c]) * scale[c0 + c]        (bias and scale in fp32)

- TopK (:class:`StreamTopK`): each row keeps its best ``KP`` packed keys (``topk.pack_keys``,
  sorted descending) across chunks. A tile of the chunk is compared, as fp32 values, with the
  value of the row's K-th best key (at least 0: only positive values are ever selected); only
  the hits are packed and appended to the row's candidate queue, which is merged into the
  best keys (bitonic network, ``QC`` keys at a time) when it could overflow and at the end of
  the chunk. A tile with more hits than the queue holds (the first tiles, while the bar is
  still 0) is merged whole. Columns arrive in ascending order (chunks in ascending ``c0``),
  so a value equal to the K-th best comes after it and loses the tie (ties go to the lower
  latent index): the strict compare is exact.
- Threshold (:class:`StreamThreshold`): each row appends its latents with ``v > thr[j]`` to
  its ``cap`` slots in ascending latent order (positions from a prefix sum, no atomics: one
  program owns a row) and counts every hit, also past ``cap``, so an overflow is exact.

NaN: a NaN value never passes a compare, so it is never selected (the rule of every backend).
Extra memory: ``T x KP`` keys and a ``T x QCAP`` queue (top-k), or the ``T x cap`` slots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .topk import EMPTY, EMPTY_KEY, merge_running_topk, pack_keys, unpack_keys
from .tuning import interpreting, next_pow2

MAX_K = 256


@triton.jit
def _kth_value(best, K, KP: tl.constexpr):
    """fp32 value of each row's K-th best key (``best`` sorted descending), 0 when empty."""
    kk = tl.arange(0, KP)[None, :]
    kth = tl.min(tl.where(kk < K, best, 0x7FFFFFFFFFFFFFFF), axis=1)
    hi = (kth >> 32).to(tl.int32)
    val = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return tl.where(kth == EMPTY_KEY, 0.0, tl.maximum(val, 0.0))


@triton.jit
def _merge_queue(best, qrow, qn, KP: tl.constexpr, QC: tl.constexpr):
    """``best`` merged with the first ``qn`` keys of every row's queue, QC keys per step."""
    chunk = tl.arange(0, QC)[None, :]
    for q0 in range(0, tl.max(qn, axis=0), QC):
        q = tl.load(qrow + q0 + chunk, mask=(q0 + chunk) < qn[:, None], other=EMPTY_KEY)
        best = merge_running_topk(best, q, KP)
    return best


@triton.jit
def _tile_values(prow, BIAS, SCALE, c0, cols, col_ok, ok, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 selection values ``(P + bias) * scale`` of one tile; masked entries are -inf."""
    v = tl.load(prow + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    gc = c0 + cols
    if HAS_BIAS:
        v = v + tl.load(BIAS + gc, mask=col_ok, other=0.0)[None, :]
    if HAS_SCALE:
        v = v * tl.load(SCALE + gc, mask=col_ok, other=1.0)[None, :]
    return v


@triton.jit
def _fold_topk_kernel(P, BIAS, SCALE, BEST, QUEUE, N, C, c0, K, stride_p,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, KP: tl.constexpr,
                      QCAP: tl.constexpr, QC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    kk = tl.arange(0, KP)[None, :]
    best = tl.load(BEST + r64[:, None] * KP + kk, mask=row_ok[:, None], other=EMPTY_KEY)
    # rows past N get an infinite bar: they never hit
    thr = tl.where(row_ok, _kth_value(best, K, KP), float("inf"))
    qn = tl.zeros([BM], dtype=tl.int32)
    qrow = QUEUE + r64[:, None] * QCAP
    prow = P + r64[:, None] * stride_p
    for t0 in range(0, C, BN):
        cols = t0 + tl.arange(0, BN)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        v = _tile_values(prow, BIAS, SCALE, c0, cols, col_ok, ok, HAS_BIAS, HAS_SCALE)
        gc = c0 + cols
        hit = (v > thr[:, None]) & ok
        n_hit = tl.sum(hit.to(tl.int32), axis=1)
        if tl.max(qn + n_hit, axis=0) > QCAP:
            # the queue could overflow: merge it, which raises the bar, and filter again
            best = _merge_queue(best, qrow, qn, KP, QC)
            qn = tl.zeros([BM], dtype=tl.int32)
            thr = tl.where(row_ok, _kth_value(best, K, KP), float("inf"))
            hit = (v > thr[:, None]) & ok
            n_hit = tl.sum(hit.to(tl.int32), axis=1)
        if tl.max(n_hit, axis=0) > QCAP:
            # more hits than a queue holds (the first tiles of a row): merge the tile whole
            keys = tl.where(hit, pack_keys(v, gc[None, :] + tl.zeros([BM, BN], dtype=tl.int32)), EMPTY_KEY)
            best = merge_running_topk(best, keys, KP)
            thr = tl.where(row_ok, _kth_value(best, K, KP), float("inf"))
        elif tl.max(n_hit, axis=0) > 0:
            hit_i = hit.to(tl.int32)
            pos = tl.cumsum(hit_i, axis=1) - 1 + qn[:, None]
            tl.store(qrow + pos, pack_keys(v, gc[None, :] + tl.zeros([BM, BN], dtype=tl.int32)), mask=hit)
            qn = qn + n_hit
    best = _merge_queue(best, qrow, qn, KP, QC)
    tl.store(BEST + r64[:, None] * KP + kk, best, mask=row_ok[:, None])


@triton.jit
def _fold_threshold_kernel(P, BIAS, SCALE, THR, OUT_IDX, OUT_VAL, COUNT, N, C, c0, CAP, stride_p,
                           HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    cnt = tl.load(COUNT + rows, mask=row_ok, other=0)
    prow = P + r64[:, None] * stride_p
    slot0 = r64[:, None] * CAP
    for t0 in range(0, C, BN):
        cols = t0 + tl.arange(0, BN)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        v = _tile_values(prow, BIAS, SCALE, c0, cols, col_ok, ok, HAS_BIAS, HAS_SCALE)
        gc = c0 + cols
        t = tl.load(THR + gc, mask=col_ok, other=float("inf"))
        hit = (v > t[None, :]) & ok
        hit_i = hit.to(tl.int32)
        n_hit = tl.sum(hit_i, axis=1)
        if tl.max(n_hit, axis=0) > 0:
            pos = tl.cumsum(hit_i, axis=1) - 1 + cnt[:, None]
            keep = hit & (pos < CAP)
            tl.store(OUT_IDX + slot0 + pos, (gc[None, :] + tl.zeros([BM, BN], dtype=tl.int32)).to(tl.int64),
                     mask=keep)
            tl.store(OUT_VAL + slot0 + pos, v, mask=keep)
            cnt = cnt + n_hit
    tl.store(COUNT + rows, cnt, mask=row_ok)


def stream_config(kp: int, n: int, cols: int) -> dict:
    """Launch configuration of the fold kernels: rows per program ``BM``, tile width ``BN``,
    ``num_warps``. The kernels are memory-bound and their state is small, so one fixed
    choice per device class is used instead of an autotune (whose timing runs would fold a
    chunk into the state more than once). ``GRADSAE_STREAM_CONFIG=BM,BN,WARPS`` overrides it.

    GPU: one row per program and 1024-column tiles read by 4 warps (8 values, one or two
    16-byte loads, per thread); the interpreter: up to 32 rows and wide tiles (numpy is fast
    per element and slow per operation)."""
    env = os.environ.get("GRADSAE_STREAM_CONFIG", "").strip()
    if env:
        bm, bn, w = (int(s) for s in env.split(","))
        return {"BM": bm, "BN": max(bn, kp), "num_warps": w}
    if interpreting() or not torch.cuda.is_available():
        return {"BM": min(32, next_pow2(max(n, 1))), "BN": max(kp, min(256, next_pow2(max(cols, 1)))), "num_warps": 1}
    return {"BM": 1, "BN": max(1024, kp), "num_warps": 4}


def queue_sizes(kp: int) -> tuple[int, int]:
    """(QC keys merged per step, QCAP queue keys per row). QC >= KP (the merge network needs
    a block at least as wide as the running top-k); the queue holds four steps."""
    qc = max(kp, 64)
    return qc, 4 * qc


class StreamTopK:
    """Running per-row top-``k`` over chunks of pre-activations, folded in ascending latent
    order. ``fold`` once per chunk, then ``result``."""

    def __init__(self, n: int, k: int, device, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, config: dict | None = None):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k} is outside 1..{MAX_K}")
        self.n, self.k = int(n), int(k)
        self.kp = max(2, next_pow2(k))
        self.qc, self.qcap = queue_sizes(self.kp)
        self.best = torch.full((self.n, self.kp), EMPTY, dtype=torch.int64, device=device)
        self.queue = torch.empty((max(self.n, 1), self.qcap), dtype=torch.int64, device=device)
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        self.scale = None if scale is None else scale.to(torch.float32).contiguous()
        self.next_col = 0
        self.config = config  # launch configuration (tests); default: stream_config

    def fold(self, chunk: torch.Tensor, c0: int) -> None:
        """Fold ``chunk`` ``[n, C]`` (the pre-activations of latents ``c0 .. c0 + C - 1``,
        before bias and scale; unit column stride) into the running top-k."""
        n, C = chunk.shape
        if n != self.n:
            raise ValueError(f"chunk has {n} rows, the selection {self.n}")
        if c0 < self.next_col:
            raise ValueError(f"chunks must come in ascending latent order (c0={c0} < {self.next_col})")
        self.next_col = c0 + C
        if n == 0 or C == 0:
            return
        if chunk.stride(1) != 1:
            chunk = chunk.contiguous()
        cfg = self.config or stream_config(self.kp, n, C)
        dummy = self.best
        _fold_topk_kernel[(triton.cdiv(n, cfg["BM"]),)](
            chunk, self.bias if self.bias is not None else dummy, self.scale if self.scale is not None else dummy,
            self.best, self.queue, n, C, c0, self.k, chunk.stride(0),
            HAS_BIAS=self.bias is not None, HAS_SCALE=self.scale is not None, KP=self.kp, QCAP=self.qcap,
            QC=self.qc, BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(acts float32, indices int64)``, ``[n, k]``, descending; empty slots -1 / 0."""
        vals, idx = unpack_keys(self.best[:, : self.k])
        return vals, idx


class StreamThreshold:
    """Per-row compaction of ``v > thr[j]`` over chunks folded in ascending latent order,
    into ``cap`` slots, with exact counts. ``fold`` once per chunk, then ``result``."""

    def __init__(self, n: int, cap: int, thr: torch.Tensor, device, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, config: dict | None = None):
        self.n, self.cap = int(n), max(1, int(cap))
        self.idx = torch.full((self.n, self.cap), -1, dtype=torch.int64, device=device)
        self.val = torch.zeros((self.n, self.cap), dtype=torch.float32, device=device)
        self.count = torch.zeros(self.n, dtype=torch.int32, device=device)
        self.thr = thr.to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        self.scale = None if scale is None else scale.to(torch.float32).contiguous()
        self.next_col = 0
        self.config = config

    def fold(self, chunk: torch.Tensor, c0: int) -> None:
        """As :meth:`StreamTopK.fold`."""
        n, C = chunk.shape
        if n != self.n:
            raise ValueError(f"chunk has {n} rows, the selection {self.n}")
        if c0 < self.next_col:
            raise ValueError(f"chunks must come in ascending latent order (c0={c0} < {self.next_col})")
        self.next_col = c0 + C
        if n == 0 or C == 0:
            return
        if chunk.stride(1) != 1:
            chunk = chunk.contiguous()
        cfg = self.config or stream_config(1, n, C)
        dummy = self.val
        _fold_threshold_kernel[(triton.cdiv(n, cfg["BM"]),)](
            chunk, self.bias if self.bias is not None else dummy, self.scale if self.scale is not None else dummy,
            self.thr, self.idx, self.val, self.count, n, C, c0, self.cap, chunk.stride(0),
            HAS_BIAS=self.bias is not None, HAS_SCALE=self.scale is not None,
            BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(acts float32 [n, cap], indices int64 [n, cap], counts int64 [n])``, ascending
        latent order; a row with ``counts > cap`` overflowed (its slots hold its first
        ``cap`` active latents)."""
        return self.val, self.idx, self.count.to(torch.int64)
