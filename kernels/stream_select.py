"""Streaming selection: fold one chunk of pre-activations into a running per-row selection.

The chunked strategy (:mod:`gradsae.backends.chunked`) lets the vendor GEMM write the encode of one
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
Extra memory: ``T x KP`` keys and a ``T x (BN + 2 QC)`` queue (top-k; 42 MB at T=8192 with
the GPU's 512-column tiles), or the ``T x cap`` slots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gradsae.op.contract import MAX_K  # absolute: see encode_select.py
from .topk import EMPTY, EMPTY_KEY, kth_bar, merge_queue, queue_hits, unpack_keys
from .tuning import interpreting, next_pow2


@triton.jit
def _tile_raw(prow, row_ok, t0, C, BN: tl.constexpr):
    """The chunk's values of the tile at column t0 as stored (-inf past the chunk or N)."""
    cols = t0 + tl.arange(0, BN)
    return tl.load(prow + cols[None, :], mask=row_ok[:, None] & (cols < C)[None, :], other=float("-inf"))


@triton.jit
def _tile_values(raw, BIAS, SCALE, c0, cols, col_ok, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 selection values ``(P + bias) * scale`` of one tile; masked entries stay -inf."""
    v = raw.to(tl.float32)
    gc = c0 + cols
    if HAS_BIAS:
        v = v + tl.load(BIAS + gc, mask=col_ok, other=0.0)[None, :]
    if HAS_SCALE:
        v = v * tl.load(SCALE + gc, mask=col_ok, other=1.0)[None, :]
    return v


@triton.jit(do_not_specialize=["N", "K"])  # (a new token count or k compiles nothing new)
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
    bar = tl.where(row_ok, kth_bar(best, K, KP), float("inf"))
    qn = tl.zeros([BM], dtype=tl.int32)
    qbase = QUEUE + pid.to(tl.int64) * (BM * QCAP)
    prow = P + r64[:, None] * stride_p
    raw = _tile_raw(prow, row_ok, 0, C, BN)
    for t0 in range(0, C, BN):
        nxt = _tile_raw(prow, row_ok, t0 + BN, C, BN)  # the next tile's loads in flight meanwhile
        # a queue that could not take a whole tile is merged first, which also raises the bar
        if tl.max(qn, axis=0) > QCAP - BN:
            best = merge_queue(best, qbase, qn, KP, QC, QCAP)
            qn = tl.zeros([BM], dtype=tl.int32)
            bar = tl.where(row_ok, kth_bar(best, K, KP), float("inf"))
        cols = t0 + tl.arange(0, BN)
        v = _tile_values(raw, BIAS, SCALE, c0, cols, cols < C, HAS_BIAS, HAS_SCALE)
        qn = queue_hits(v, c0 + cols, bar, qbase, qn, QCAP)
        raw = nxt
    best = merge_queue(best, qbase, qn, KP, QC, QCAP)
    tl.store(BEST + r64[:, None] * KP + kk, best, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N", "CAP"])
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
    raw = _tile_raw(prow, row_ok, 0, C, BN)
    for t0 in range(0, C, BN):
        nxt = _tile_raw(prow, row_ok, t0 + BN, C, BN)  # the next tile's loads in flight meanwhile
        cols = t0 + tl.arange(0, BN)
        col_ok = cols < C
        v = _tile_values(raw, BIAS, SCALE, c0, cols, col_ok, HAS_BIAS, HAS_SCALE)
        raw = nxt
        gc = c0 + cols
        t = tl.load(THR + gc, mask=col_ok, other=float("inf"))
        hit = (v > t[None, :]) & col_ok[None, :]
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


def stream_config(kp: int, n: int, cols: int, *, gpu: bool | None = None) -> dict:
    """Launch configuration of the fold kernels: rows per program ``BM``, tile width ``BN``,
    ``num_warps``. The kernels are memory-bound and their state is small, so one fixed
    choice per device class is used instead of an autotune (whose timing runs would fold a
    chunk into the state more than once). ``GRADSAE_STREAM_CONFIG=BM,BN,WARPS`` overrides it.

    GPU: one row per program and 1024-column tiles read by 4 warps (8 values a thread: one
    16-byte load of bf16, two of fp32), the next tile's loads issued before the current one
    is filtered; the interpreter: up to 32 rows and wide tiles
    (numpy is fast per element and slow per operation). ``gpu`` forces one or the other."""
    env = os.environ.get("GRADSAE_STREAM_CONFIG", "").strip()
    if env:
        bm, bn, w = (int(s) for s in env.split(","))
        return {"BM": bm, "BN": max(bn, kp), "num_warps": w}
    if gpu is None:
        gpu = not interpreting() and torch.cuda.is_available()
    if not gpu:
        bn = max(kp, min(256, next_pow2(max(cols, 1))))
        return {"BM": min(32, next_pow2(max(n, 1))), "BN": bn, "num_warps": 1}
    if kp >= 256:  # (the wider merge network: 1024-column tiles spill for KP=256)
        return {"BM": 1, "BN": 512, "num_warps": 4}
    return {"BM": 1, "BN": 1024, "num_warps": 4}


def queue_sizes(kp: int, bn: int) -> tuple[int, int]:
    """(QC keys merged per step, QCAP queue keys per row). QC >= KP (the merge network needs
    a block at least as wide as the running top-k); the queue takes a whole tile after a
    merge (so no tile is ever merged whole, whose network would cost registers everywhere)
    plus two steps."""
    qc = max(kp, 64)
    return qc, bn + 2 * qc


def _tables(sel, dummy):
    """(bias, scale) pointers of a selection, ``dummy`` for an absent one."""
    return (sel.bias if sel.bias is not None else dummy, sel.scale if sel.scale is not None else dummy)


class StreamTopK:
    """Running per-row top-``k`` over chunks of pre-activations, folded in ascending latent
    order. ``fold`` once per chunk, then ``result``."""

    def __init__(self, n: int, k: int, device, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, config: dict | None = None):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k} is outside 1..{MAX_K}")
        self.n, self.k = int(n), int(k)
        self.kp = max(2, next_pow2(k))
        self.best = torch.full((self.n, self.kp), EMPTY, dtype=torch.int64, device=device)
        self.queue = None  # [n, QCAP] keys, allocated at the first fold (QCAP depends on the tile)
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
        qc, qcap = queue_sizes(self.kp, cfg["BN"])
        rows = triton.cdiv(n, cfg["BM"]) * cfg["BM"]  # a program's block of queue rows
        if self.queue is None or self.queue.shape[1] != qcap or self.queue.shape[0] < rows:
            self.queue = torch.empty((rows, qcap), dtype=torch.int64, device=chunk.device)
        bias, scale = _tables(self, self.best)
        _fold_topk_kernel[(triton.cdiv(n, cfg["BM"]),)](
            chunk, bias, scale, self.best, self.queue, n, C, c0, self.k, chunk.stride(0),
            HAS_BIAS=self.bias is not None, HAS_SCALE=self.scale is not None, KP=self.kp,
            QCAP=self.queue.shape[1], QC=qc, BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
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
        bias, scale = _tables(self, self.val)
        _fold_threshold_kernel[(triton.cdiv(n, cfg["BM"]),)](
            chunk, bias, scale, self.thr, self.idx, self.val, self.count, n, C, c0, self.cap, chunk.stride(0),
            HAS_BIAS=self.bias is not None, HAS_SCALE=self.scale is not None,
            BM=cfg["BM"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(acts float32 [n, cap], indices int64 [n, cap], counts int64 [n])``, ascending
        latent order; a row with ``counts > cap`` overflowed (its slots hold its first
        ``cap`` active latents)."""
        return self.val, self.idx, self.count.to(torch.int64)


# ---------------------------------------------------------------------------- ahead of time
def aot_spec_topk(cfg: dict, kp: int, p: str):
    """The top-k fold in launch configuration ``cfg`` for a chunk of type ``p`` (``*bf16``)
    at the target shape, for :mod:`.aot`."""
    from .aot import Spec

    qc, qcap = queue_sizes(kp, cfg["BN"])
    sig = {"P": p, "BIAS": "*fp32", "SCALE": "*fp32", "BEST": "*i64", "QUEUE": "*i64", "N": "i32", "C": "i32",
           "c0": "i32", "K": "i32", "stride_p": "i32"}
    const = dict(HAS_BIAS=True, HAS_SCALE=True, KP=kp, QCAP=qcap, QC=qc, BM=cfg["BM"], BN=cfg["BN"])
    sig.update({name: "constexpr" for name in const})
    return Spec("stream_topk", _fold_topk_kernel, sig, const, cfg["num_warps"], 1,
                divisible=("C", "c0", "stride_p"), meta=dict(KP=kp, BM=cfg["BM"], BN=cfg["BN"], dtype=p))


def aot_spec_threshold(cfg: dict, p: str):
    from .aot import Spec

    sig = {"P": p, "BIAS": "*fp32", "SCALE": "*fp32", "THR": "*fp32", "OUT_IDX": "*i64", "OUT_VAL": "*fp32",
           "COUNT": "*i32", "N": "i32", "C": "i32", "c0": "i32", "CAP": "i32", "stride_p": "i32"}
    const = dict(HAS_BIAS=True, HAS_SCALE=True, BM=cfg["BM"], BN=cfg["BN"])
    sig.update({name: "constexpr" for name in const})
    return Spec("stream_threshold", _fold_threshold_kernel, sig, const, cfg["num_warps"], 1,
                divisible=("C", "c0", "stride_p"), meta=dict(BM=cfg["BM"], BN=cfg["BN"], dtype=p))
