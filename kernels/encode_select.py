"""Fused encode + select: the encode GEMM with the selection in its epilogue.

    v = (a @ W_enc + bias) * dec_norm?        a: the encoder input [N, d_in]

is computed tile by tile ([BM tokens, BN latents], fp32 accumulation) and never written.
The work is cut into items (a block of BM rows x a split of d_sae); a persistent grid sized
by the SM count walks them, item ``pid``, ``pid + nprog``, ... in split-major order, so the
programs running at one time share the same W_enc columns through L2, and the number of
splits is chosen so that every program gets (nearly) the same number of items.

- TopK: per item, each row keeps a running top-``KP`` of packed value/index keys
  (``topk.pack_keys``). The epilogue compares each tile's fp32 values with the row's bar (the
  value of its K-th best key, at least 0: only positive values are ever selected) before
  anything is packed; only the hits are packed and appended to the row's candidate queue in
  global scratch (L2-resident), which is merged into the running keys ``QC`` at a time when
  it could not take another tile. The item writes ``[N, S, KP]`` partial keys; the second
  stage (``topk.merge_partials``) picks the final top-k. ``queue=False`` instead merges every
  tile whole (the same result; the interpreter's reference path).
- Threshold (JumpReLU / ReLU): the active entries ``v > thr`` of a tile are compacted into
  the row's slots ``[N, cap]`` as packed keys (value and index in one store): positions
  inside the tile from a prefix sum, the row's base reserved with one relaxed atomic add on
  its counter (only the counter's value matters, no ordering). Counters keep counting past
  ``cap``, so an overflow is detected exactly (and the caller retries or raises); slots are
  then sorted by latent index, which makes the result independent of scheduling.

NaN: a NaN value never passes a compare, so it is never selected (the rule of every backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradsae.op.contract import MAX_K  # absolute: this folder may also be found as a top-level `kernels`
from .topk import (
    EMPTY,
    EMPTY_KEY,
    kth_bar,
    merge_partials,
    merge_queue,
    merge_running_topk,
    pack_keys,
    queue_hits,
    unpack_keys,
)
from .tuning import (
    SPLIT_GRANULE,
    autotune_configs,
    fixed_config,
    interpreting,
    n_bucket,
    next_pow2,
    num_sms,
    prune_encode_configs,
)

# Partial keys [N, S, KP] stay under this many bytes (rows of a call are not split: the splits
# are fewer instead).
PARTS_BUDGET = 512 << 20
# Persistent programs per SM (the grid); a program holds one item at a time.
PROGRAMS_PER_SM = 2


@triton.jit
def _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                 HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """fp32 selection values of the [BM, BN] tile at (row0, c0), zero-padded at the edges.
    The K-loop carries two scalar base pointers; the per-element offsets inside a tile are
    loop-invariant int32 (fewer registers than 64-bit pointer tiles)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    lr = tl.arange(0, BM)
    lc = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = (row0 + lr) < N
    w_ok = (c0 + lc) < D_SAE
    a_off = lr[:, None] * stride_xm + ks[None, :]
    w_off = ks[:, None] * stride_wk + lc[None, :]
    xb = X + row0.to(tl.int64) * stride_xm
    wb = W + c0
    for k0 in range(0, D_IN, BK):
        k_ok = (k0 + ks) < D_IN
        a = tl.load(xb + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wb + w_off, mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        xb += BK
        wb += BK * stride_wk
    v = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_SCALE:
        v = v * tl.load(SCALE + cols, mask=col_ok, other=1.0)[None, :]
    return v


@triton.jit
def _part_ptrs(PART, rows, split, stride_pm, KP: tl.constexpr):
    """The item's slots in the partial results: [BM, KP]."""
    return PART + rows.to(tl.int64)[:, None] * stride_pm + split * KP + tl.arange(0, KP)[None, :]


@triton.jit
def _merge_into(PART, rows, row_ok, split, stride_pm, qbase, qn, K, KP: tl.constexpr, QC: tl.constexpr,
                QSTRIDE: tl.constexpr):
    """Merge the rows' queues into their running top-k, kept in the item's partial-result
    slots; returns the new bars."""
    tl.debug_barrier()  # the running keys were stored by other threads
    out = _part_ptrs(PART, rows, split, stride_pm, KP)
    best = tl.load(out, mask=row_ok[:, None], other=EMPTY_KEY)
    best = merge_queue(best, qbase, qn, KP, QC, QSTRIDE)
    tl.store(out, best, mask=row_ok[:, None])
    return tl.where(row_ok, kth_bar(best, K, KP), float("inf"))


# Integers whose divisibility by 16 changes nothing in the code are not specialised on, so a
# new token count or k does not compile the kernel again.
@triton.jit(do_not_specialize=["N", "N_SPLITS", "K", "N_BUCKET"])
def _encode_topk_kernel(X, W, BIAS, SCALE, PART, QUEUE, N, D_IN, D_SAE, COLS_PER_SPLIT, N_SPLITS, K,
                        stride_xm, stride_wk, stride_pm, N_BUCKET,
                        HAS_SCALE: tl.constexpr, KP: tl.constexpr, QUEUED: tl.constexpr,
                        QC: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    row_blocks = tl.cdiv(N, BM)
    # a program's queue rows, reused item after item: BM x QSTRIDE keys, a whole tile above
    # the merge mark of two merge steps (queue_layout)
    QSTRIDE: tl.constexpr = BN + 2 * QC
    qbase = QUEUE + pid.to(tl.int64) * (BM * QSTRIDE)
    for item in range(pid, row_blocks * N_SPLITS, nprog):
        split = item // row_blocks
        row0 = (item % row_blocks) * BM
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < N
        c_start = split * COLS_PER_SPLIT
        c_end = tl.minimum(c_start + COLS_PER_SPLIT, D_SAE)
        # the item's running top-k lives in its partial-result slots, not in registers across
        # the GEMM: it is read only when a queue is merged (QUEUED)
        if QUEUED:
            empty = tl.full([BM, KP], EMPTY_KEY, dtype=tl.int64)
            tl.store(_part_ptrs(PART, rows, split, stride_pm, KP), empty, mask=row_ok[:, None])
        else:
            best = tl.full([BM, KP], EMPTY_KEY, dtype=tl.int64)
        bar = tl.where(row_ok, 0.0, float("inf"))  # rows past N never hit
        qn = tl.zeros([BM], dtype=tl.int32)
        for c0 in range(c_start, c_end, BN):
            if QUEUED:
                # a queue that could not take a whole tile is merged first (before the tile's
                # values are live), which also raises the bar
                if tl.max(qn, axis=0) > QSTRIDE - BN:
                    bar = _merge_into(PART, rows, row_ok, split, stride_pm, qbase, qn, K, KP, QC, QSTRIDE)
                    qn = tl.zeros([BM], dtype=tl.int32)
            cols = c0 + tl.arange(0, BN)
            # ALIGNED: tiles never straddle a split boundary, so the bound is D_SAE (known
            # divisibility); else the split's end
            col_ok = cols < (D_SAE if ALIGNED else c_end)
            v = _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                             HAS_SCALE, BM, BN, BK, UPCAST, PREC)
            v = tl.where(col_ok[None, :], v, float("-inf"))
            if QUEUED:
                qn = queue_hits(v, cols, bar, qbase, qn, QSTRIDE)
            else:
                ok = (v > bar[:, None])  # NaN and non-positive values never enter
                idx = cols[None, :] + tl.zeros([BM, BN], dtype=tl.int32)
                keys = tl.where(ok, pack_keys(v, idx), EMPTY_KEY)
                best = merge_running_topk(best, keys, KP)
        if QUEUED:
            _merge_into(PART, rows, row_ok, split, stride_pm, qbase, qn, K, KP, QC, QSTRIDE)
        else:
            tl.store(_part_ptrs(PART, rows, split, stride_pm, KP), best, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N", "N_SPLITS", "CAP", "N_BUCKET"])
def _encode_threshold_kernel(X, W, BIAS, SCALE, THR, OUT, COUNT, N, D_IN, D_SAE,
                             COLS_PER_SPLIT, N_SPLITS, CAP, stride_xm, stride_wk, N_BUCKET,
                             HAS_SCALE: tl.constexpr, OFF64: tl.constexpr, ALIGNED: tl.constexpr,
                             UPCAST: tl.constexpr, PREC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    row_blocks = tl.cdiv(N, BM)
    for item in range(pid, row_blocks * N_SPLITS, nprog):
        split = item // row_blocks
        row0 = (item % row_blocks) * BM
        rows = row0 + tl.arange(0, BM)
        c_start = split * COLS_PER_SPLIT
        c_end = tl.minimum(c_start + COLS_PER_SPLIT, D_SAE)
        # slots: a scalar base and int32 offsets unless N * CAP needs more (a [BM, BN] tile of
        # 64-bit addresses would cost registers the GEMM needs). Each row has CAP + 1 slots,
        # the last one a sink for what overflows, and the rows are padded to a multiple of
        # BM: the epilogue needs no row or capacity mask, only the hit mask.
        out = OUT + row0.to(tl.int64) * (CAP + 1)
        row_base = (tl.arange(0, BM).to(tl.int64) if OFF64 else tl.arange(0, BM))[:, None] * (CAP + 1)
        for c0 in range(c_start, c_end, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < (D_SAE if ALIGNED else c_end)
            v = _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                             HAS_SCALE, BM, BN, BK, UPCAST, PREC)
            thr = tl.load(THR + cols, mask=col_ok, other=float("inf"))
            hit = v > thr[None, :]
            hit_i = hit.to(tl.int32)
            n_hit = tl.sum(hit_i, axis=1)
            base = tl.atomic_add(COUNT + rows, n_hit, mask=n_hit > 0, sem="relaxed")
            slot = tl.minimum(base[:, None] + tl.cumsum(hit_i, axis=1) - 1, CAP)
            # one packed key per active latent (value and index in one store)
            tl.store(out + row_base + slot, pack_keys(v, cols[None, :] + tl.zeros([BM, BN], dtype=tl.int32)),
                     mask=hit)


_TOPK_KEY = ["D_IN", "D_SAE", "N_BUCKET", "KP", "QUEUED", "HAS_SCALE", "UPCAST", "PREC"]
_THRESHOLD_KEY = ["D_IN", "D_SAE", "N_BUCKET", "HAS_SCALE", "OFF64", "UPCAST", "PREC"]

_topk_tuned = triton.autotune(
    configs=autotune_configs("topk"),
    key=_TOPK_KEY,
    prune_configs_by={"early_config_prune": prune_encode_configs},
)(_encode_topk_kernel)

_threshold_tuned = triton.autotune(
    configs=autotune_configs("threshold"),
    key=_THRESHOLD_KEY,
    reset_to_zero=["COUNT"],
    prune_configs_by={"early_config_prune": prune_encode_configs},
)(_encode_threshold_kernel)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast loads to fp32, tl.dot input precision) for an input dtype."""
    if interpreting():
        # The interpreter does half-precision arithmetic on raw bits: compute in fp32 (the
        # products of bf16/fp16 values are exact in fp32, as on tensor cores).
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "tf32"  # Triton's default; only meaningful for fp32 operands


def n_programs() -> int:
    """Persistent programs: PROGRAMS_PER_SM per SM."""
    return PROGRAMS_PER_SM * num_sms()


def plan_splits(n: int, d_sae: int, n_splits: int | None = None, *, bm: int | None = None,
                nprog: int | None = None, slot_bytes: int = 0) -> tuple[int, int]:
    """(number of d_sae splits S, columns per split; a multiple of the split granule).

    Items are (block of ``bm`` rows) x (split); ``nprog`` persistent programs take them in
    turn. Without ``n_splits``, S is chosen in [s0, 4 s0] (s0: enough items for four per
    program), among the counts that cut d_sae into equal splits where there are such, for
    the fewest idle program-slots in the last round, then the fewest splits; never more
    splits than granules of d_sae, nor more partial results (``slot_bytes`` per row and
    split) than PARTS_BUDGET."""
    granule = SPLIT_GRANULE if not interpreting() else 64
    granules = triton.cdiv(d_sae, granule)

    def realise(s):
        s = max(1, min(int(s), granules))
        cols = triton.cdiv(granules, s) * granule
        return triton.cdiv(d_sae, cols), cols

    if n_splits is not None:
        return realise(n_splits)
    bm = bm or (64 if not interpreting() else 32)
    nprog = nprog or n_programs()
    row_blocks = triton.cdiv(max(n, 1), bm)
    s_max = granules
    if slot_bytes:
        s_max = max(1, min(s_max, PARTS_BUDGET // max(1, n * slot_bytes)))
    s0 = min(triton.cdiv(4 * nprog, row_blocks), s_max)
    span = range(s0, min(4 * s0, s_max) + 1)
    even = [s for s in span if granules % s == 0]
    best = None
    for s in even or span:
        S, cols = realise(s)
        items = row_blocks * S
        idle = (-items) % nprog / items
        key = (round(idle, 3), S)
        if best is None or key < best[0]:
            best = (key, (S, cols))
    return best[1]


def _check(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor) -> None:
    if a.dtype != W_enc.dtype:
        raise TypeError(f"encoder input is {a.dtype} but W_enc is {W_enc.dtype}")
    if a.shape[1] != W_enc.shape[0] or bias.shape[0] != W_enc.shape[1]:
        raise ValueError(f"shapes do not agree: a {tuple(a.shape)}, W_enc {tuple(W_enc.shape)}, bias {tuple(bias.shape)}")


def queue_layout(kp: int, bn: int) -> tuple[int, int]:
    """(QC keys merged per step, QSTRIDE queue keys per row): the queue takes a whole tile
    above its merge mark of two steps."""
    qc = max(kp, 64)
    return qc, bn + 2 * qc


def encode_topk(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                dec_norm: torch.Tensor | None = None, *, n_splits: int | None = None,
                deterministic: bool = False, queue: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` latents of ``v = (a @ W_enc + bias) * dec_norm`` per row, no dense ``v``.

    Args:
        a: encoder input ``[N, d_in]`` (b_dec already handled: subtracted, or folded into
            ``bias``), in W_enc's dtype.
        W_enc: ``[d_in, d_sae]``; bias: float32 ``[d_sae]``; dec_norm: float32 ``[d_sae]``
            to rank by decoder-norm-rescaled values, or None.
        k: latents per row, ``1 <= k <= 256``; the result has ``min(k, d_sae)`` slots.
        n_splits: d_sae splits (default: planned by :func:`plan_splits`).
        deterministic: a fixed tile configuration instead of the autotuned one (the values
            then never depend on which configuration won a tuning run).
        queue: filter each tile against the row's bar into a candidate queue (default);
            False merges every tile whole. The result is the same either way.

    Returns:
        ``(acts float32, indices int64)``, ``[N, min(k, d_sae)]``, descending by value; empty
        slots (value not positive) hold index -1 and act 0.
    """
    _check(a, W_enc, bias)
    n, d_in = a.shape
    d_sae = W_enc.shape[1]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} is outside 1..{MAX_K}")
    K = min(k, d_sae)
    KP = max(2, next_pow2(K))
    a = a.contiguous()
    W_enc = W_enc if W_enc.stride(1) == 1 else W_enc.contiguous()
    queue = True if queue is None else bool(queue)
    nprog = n_programs()
    fixed = deterministic or interpreting()
    elem = a.element_size()
    cfg = fixed_config(KP, d_sae, n, "topk", elem) if fixed else None
    S, cols = plan_splits(n, d_sae, n_splits, bm=cfg[0]["BM"] if cfg else None, nprog=nprog,
                          slot_bytes=KP * 8)
    cfg = fixed_config(KP, cols, n, "topk", elem) if fixed else None
    part = torch.empty((n, S, KP), dtype=torch.int64, device=a.device)
    # queue scratch: a BM x QSTRIDE block per program, for the largest tile any configuration uses
    tiles = [(cfg[0]["BM"], cfg[0]["BN"])] if cfg else [(c.kwargs["BM"], c.kwargs["BN"])
                                                          for c in autotune_configs("topk")]
    qc = queue_layout(KP, 1)[0]
    per_program = max(bm * queue_layout(KP, bn)[1] for bm, bn in tiles)
    scratch = torch.empty(nprog * per_program if queue else 1, dtype=torch.int64, device=a.device)
    upcast, prec = _precision(a.dtype)
    scale = dec_norm if dec_norm is not None else bias
    args = (a, W_enc, bias, scale, part, scratch, n, d_in, d_sae, cols, S, K, a.stride(0), W_enc.stride(0),
            S * KP, n_bucket(n))
    flags = dict(HAS_SCALE=dec_norm is not None, KP=KP, QUEUED=queue, QC=qc, UPCAST=upcast,
                 PREC=prec)
    if fixed:
        meta, warps, stages = cfg
        flags["ALIGNED"] = cols % meta["BN"] == 0
        grid = (min(nprog, triton.cdiv(n, meta["BM"]) * S),)
        _encode_topk_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (min(nprog, triton.cdiv(n, m["BM"]) * S),)  # noqa: E731
        _topk_tuned[grid](*args, **flags, ALIGNED=True)  # every tuned BN divides SPLIT_GRANULE
    return merge_partials(part, K)


def encode_threshold(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, thr: torch.Tensor,
                     cap: int, dec_norm: torch.Tensor | None = None, *, n_splits: int | None = None,
                     deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active latents ``v > thr`` of ``v = (a @ W_enc + bias) * dec_norm``, compacted per row.

    Args:
        a, W_enc, bias, dec_norm, n_splits, deterministic: as in :func:`encode_topk`.
        thr: float32 ``[d_sae]``, the strict threshold per latent.
        cap: slots per row.

    Returns:
        ``(acts float32 [N, cap], indices int64 [N, cap], counts int64 [N])``: each row's
        active latents in ascending index order (-1 / 0 in empty slots) and the true number
        of active latents per row. A row with ``counts > cap`` overflowed: its slots hold an
        arbitrary subset and the caller must retry with a larger ``cap`` or report it.
    """
    _check(a, W_enc, bias)
    n, d_in = a.shape
    d_sae = W_enc.shape[1]
    cap = max(1, int(cap))
    a = a.contiguous()
    W_enc = W_enc if W_enc.stride(1) == 1 else W_enc.contiguous()
    nprog = n_programs()
    fixed = deterministic or interpreting()
    elem = a.element_size()
    cfg = fixed_config(1, d_sae, n, "threshold", elem) if fixed else None
    S, cols = plan_splits(n, d_sae, n_splits, bm=cfg[0]["BM"] if cfg else None, nprog=nprog)
    cfg = fixed_config(1, cols, n, "threshold", elem) if fixed else None
    # rows padded to a multiple of the widest row tile, one sink slot per row (see the kernel)
    rows_pad = triton.cdiv(n, 128) * 128
    out = torch.full((rows_pad, cap + 1), EMPTY, dtype=torch.int64, device=a.device)
    count = torch.zeros(rows_pad, dtype=torch.int32, device=a.device)
    upcast, prec = _precision(a.dtype)
    scale = dec_norm if dec_norm is not None else bias
    args = (a, W_enc, bias, scale, thr, out, count, n, d_in, d_sae, cols, S, cap,
            a.stride(0), W_enc.stride(0), n_bucket(n))
    flags = dict(HAS_SCALE=dec_norm is not None, OFF64=rows_pad * (cap + 1) >= 2**31, UPCAST=upcast,
                 PREC=prec)
    if fixed:
        meta, warps, stages = cfg
        flags["ALIGNED"] = cols % meta["BN"] == 0
        grid = (min(nprog, triton.cdiv(n, meta["BM"]) * S),)
        _encode_threshold_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (min(nprog, triton.cdiv(n, m["BM"]) * S),)  # noqa: E731
        _threshold_tuned[grid](*args, **flags, ALIGNED=True)
    # Slot order depends on which split reserved first: sort by latent index (empty last).
    vals, idx = unpack_keys(out[:n, :cap])
    count = count[:n]
    idx, order = torch.where(idx < 0, torch.full_like(idx, d_sae), idx).sort(dim=1)
    vals = vals.gather(1, order)
    empty = idx == d_sae
    idx = torch.where(empty, torch.full_like(idx, -1), idx)
    vals = torch.where(empty, torch.zeros_like(vals), vals)
    return vals, idx, count.to(torch.int64)


# ---------------------------------------------------------------------------- ahead of time
def _aot_prec(p: str) -> str:
    """fp32 inputs: exact fp32 products, torch's default (allow_tf32 off)."""
    return "ieee" if p == "*fp32" else "tf32"


def _aot_types(p: str) -> dict:
    return {"X": p, "W": p, "BIAS": "*fp32", "SCALE": "*fp32"}


def aot_spec_topk(cfg: tuple, kp: int, p: str):
    """The top-k kernel in configuration ``cfg`` = (BM, BN, BK, stages, warps) for the target
    shape (bf16 ``p`` = ``*bf16``), for :mod:`.aot`."""
    from .aot import Spec

    bm, bn, bk, stages, warps = cfg
    qc, _ = queue_layout(kp, bn)
    sig = {**_aot_types(p), "PART": "*i64", "QUEUE": "*i64", "N": "i32", "D_IN": "i32", "D_SAE": "i32",
           "COLS_PER_SPLIT": "i32", "N_SPLITS": "i32", "K": "i32", "stride_xm": "i32", "stride_wk": "i32",
           "stride_pm": "i32", "N_BUCKET": "i32"}
    const = dict(HAS_SCALE=True, KP=kp, QUEUED=True, QC=qc, ALIGNED=True, UPCAST=False,
                 PREC=_aot_prec(p), BM=bm, BN=bn, BK=bk)
    sig.update({name: "constexpr" for name in const})
    return Spec("encode_topk", _encode_topk_kernel, sig, const, warps, stages,
                divisible=("D_IN", "D_SAE", "COLS_PER_SPLIT", "stride_xm", "stride_wk", "stride_pm"),
                meta=dict(KP=kp, BM=bm, BN=bn, BK=bk, dtype=p))


def aot_spec_threshold(cfg: tuple, p: str):
    from .aot import Spec

    bm, bn, bk, stages, warps = cfg
    sig = {**_aot_types(p), "THR": "*fp32", "OUT": "*i64", "COUNT": "*i32", "N": "i32",
           "D_IN": "i32", "D_SAE": "i32", "COLS_PER_SPLIT": "i32", "N_SPLITS": "i32", "CAP": "i32",
           "stride_xm": "i32", "stride_wk": "i32", "N_BUCKET": "i32"}
    const = dict(HAS_SCALE=True, OFF64=False, ALIGNED=True, UPCAST=False, PREC=_aot_prec(p),
                 BM=bm, BN=bn, BK=bk)
    sig.update({name: "constexpr" for name in const})
    return Spec("encode_threshold", _encode_threshold_kernel, sig, const, warps, stages,
                divisible=("D_IN", "D_SAE", "COLS_PER_SPLIT", "stride_xm", "stride_wk"),
                meta=dict(BM=bm, BN=bn, BK=bk, dtype=p))


__all__ = ["encode_topk", "encode_threshold", "plan_splits", "EMPTY"]
