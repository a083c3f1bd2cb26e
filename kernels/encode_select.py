"""Fused encode + select: the encode GEMM with the selection in its epilogue.

    v = (a @ W_enc + bias) * dec_norm?        a: the encoder input [N, d_in]

is computed tile by tile ([BM tokens, BN latents], fp32 accumulation) and never written.
The grid is (token blocks x d_sae splits); program ``pid`` takes split ``pid // row_blocks``
so the programs running at one time walk the same W_enc columns and share them through L2.

- TopK: each program keeps a per-row running top-``KP`` of packed value/index keys over its
  split (``topk.merge_running_topk``) and writes ``[N, S, KP]`` partial keys; the second
  stage (``topk.merge_partials``) picks the final top-k. Extra memory: N x S x KP x 8 bytes.
- Threshold (JumpReLU / ReLU): the active entries ``v > thr`` of a tile are compacted into
  the row's slots ``[N, cap]``: positions inside the tile from a prefix sum, the row's base
  reserved with one atomic add on its counter. Counters keep counting past ``cap``, so an
  overflow is detected exactly (and the caller retries or raises); slots are then sorted by
  latent index, which makes the result independent of scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradsae.op.contract import MAX_K  # absolute: this folder may also be found as a top-level `kernels`
from .topk import EMPTY_KEY, merge_partials, merge_running_topk, pack_keys
from .tuning import (
    SPLIT_GRANULE,
    encode_configs,
    fixed_config,
    interpreting,
    next_pow2,
    num_sms,
    prune_encode_configs,
)


@triton.jit
def _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                 HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """fp32 selection values of the [BM, BN] tile at (row0, c0), zero-padded at the edges."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < N
    w_ok = cols < D_SAE
    ks = tl.arange(0, BK)
    a_ptr = X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptr = W + ks.to(tl.int64)[:, None] * stride_wk + cols[None, :]
    for k0 in range(0, D_IN, BK):
        k_ok = (k0 + ks) < D_IN
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        a_ptr += BK
        w_ptr += BK * stride_wk
    v = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_SCALE:
        v = v * tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :]
    return v


@triton.jit
def _encode_topk_kernel(X, W, BIAS, SCALE, PART, QUEUE, N, D_IN, D_SAE, COLS_PER_SPLIT,
                        stride_xm, stride_wk, stride_pm,
                        HAS_SCALE: tl.constexpr, KP: tl.constexpr, QUEUED: tl.constexpr,
                        QSTRIDE: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BM)
    split = pid // row_blocks
    row0 = (pid % row_blocks) * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < N
    c_start = split * COLS_PER_SPLIT
    c_end = tl.minimum(c_start + COLS_PER_SPLIT, D_SAE)
    best = tl.full([BM, KP], EMPTY_KEY, dtype=tl.int64)
    # Candidate queues (QUEUED): a tile's keys above the row's current k-th best are appended
    # to the row's queue in global scratch (L2-resident). Before a tile is computed, a queue
    # that could not take a whole tile more is merged into the running top-k, KP keys at a
    # time; so the bitonic network runs rarely, never while a tile is live in registers.
    kth = tl.full([BM], EMPTY_KEY, dtype=tl.int64)
    qn = tl.zeros([BM], dtype=tl.int32)
    q_base = QUEUE + pid.to(tl.int64) * (BM * QSTRIDE)
    q_rows = tl.arange(0, BM)[:, None] * QSTRIDE
    QC: tl.constexpr = KP if KP > 64 else 64  # queue keys merged per step
    chunk = tl.arange(0, QC)[None, :]
    for c0 in range(c_start, c_end, BN):
        if QUEUED:
            if tl.max(qn, axis=0) > QSTRIDE - BN:
                tl.debug_barrier()
                for q0 in range(0, tl.max(qn, axis=0), QC):
                    q = tl.load(q_base + q_rows + q0 + chunk, mask=(q0 + chunk) < qn[:, None], other=EMPTY_KEY)
                    best = merge_running_topk(best, q, KP)
                kth = tl.min(best, axis=1)
                qn = tl.zeros([BM], dtype=tl.int32)
                tl.debug_barrier()
        cols = c0 + tl.arange(0, BN)
        # ALIGNED: tiles never straddle a split boundary, so the bound is D_SAE (known
        # divisibility); else the split's end
        col_ok = cols < (D_SAE if ALIGNED else c_end)
        v = _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                         HAS_SCALE, BM, BN, BK, UPCAST, PREC)
        keys = tl.where(col_ok[None, :], pack_keys(v, cols), EMPTY_KEY)
        if QUEUED:
            hit = keys > kth[:, None]
            hit_i = hit.to(tl.int32)
            pos = tl.cumsum(hit_i, axis=1) - 1 + qn[:, None]
            tl.store(q_base + q_rows + pos, keys, mask=hit)
            qn = qn + tl.sum(hit_i, axis=1)
        else:
            best = merge_running_topk(best, keys, KP)
    if QUEUED:
        tl.debug_barrier()
        for q0 in range(0, tl.max(qn, axis=0), QC):
            q = tl.load(q_base + q_rows + q0 + chunk, mask=(q0 + chunk) < qn[:, None], other=EMPTY_KEY)
            best = merge_running_topk(best, q, KP)
    out = PART + rows.to(tl.int64)[:, None] * stride_pm + split * KP + tl.arange(0, KP)[None, :]
    tl.store(out, best, mask=row_ok[:, None])


@triton.jit
def _encode_threshold_kernel(X, W, BIAS, SCALE, THR, OUT_IDX, OUT_VAL, COUNT, N, D_IN, D_SAE,
                             COLS_PER_SPLIT, CAP, stride_xm, stride_wk,
                             HAS_SCALE: tl.constexpr, OFF64: tl.constexpr, ALIGNED: tl.constexpr,
                             UPCAST: tl.constexpr, PREC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BM)
    split = pid // row_blocks
    row0 = (pid % row_blocks) * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < N
    c_start = split * COLS_PER_SPLIT
    c_end = tl.minimum(c_start + COLS_PER_SPLIT, D_SAE)
    # slot offsets in 32 bits unless N * CAP needs more (fewer registers for the scatter)
    row_base = (rows.to(tl.int64) if OFF64 else rows)[:, None] * CAP
    for c0 in range(c_start, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        # ALIGNED: tiles never straddle a split boundary, so the bound is D_SAE (known
        # divisibility); else the split's end
        col_ok = cols < (D_SAE if ALIGNED else c_end)
        v = _encode_tile(X, W, BIAS, SCALE, row0, c0, cols, col_ok, N, D_IN, D_SAE, stride_xm, stride_wk,
                         HAS_SCALE, BM, BN, BK, UPCAST, PREC)
        thr = tl.load(THR + cols, mask=col_ok, other=float("inf"))
        hit = (v > thr[None, :]) & col_ok[None, :] & row_ok[:, None]
        hit_i = hit.to(tl.int32)
        n_hit = tl.sum(hit_i, axis=1)
        pos = tl.cumsum(hit_i, axis=1) - 1
        base = tl.atomic_add(COUNT + rows, n_hit, mask=n_hit > 0)
        slot = base[:, None] + pos
        ok = hit & (slot < CAP)
        tl.store(OUT_IDX + row_base + slot, cols[None, :] + tl.zeros([BM, BN], dtype=tl.int32), mask=ok)
        tl.store(OUT_VAL + row_base + slot, v, mask=ok)


_topk_tuned = triton.autotune(
    configs=encode_configs(),
    key=["D_IN", "D_SAE", "KP", "QUEUED", "HAS_SCALE", "UPCAST", "PREC"],
    prune_configs_by={"early_config_prune": prune_encode_configs},
)(_encode_topk_kernel)

_threshold_tuned = triton.autotune(
    configs=encode_configs(),
    key=["D_IN", "D_SAE", "HAS_SCALE", "OFF64", "UPCAST", "PREC"],
    reset_to_zero=["COUNT"],
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


def plan_splits(n: int, d_sae: int, n_splits: int | None = None) -> tuple[int, int]:
    """(number of d_sae splits, columns per split). Enough programs to fill the device
    (about two per SM), never more splits than granules of d_sae."""
    granule = SPLIT_GRANULE if not interpreting() else 64
    granules = triton.cdiv(d_sae, granule)
    if n_splits is None:
        row_blocks = triton.cdiv(n, 64 if not interpreting() else 32)
        n_splits = triton.cdiv(2 * num_sms(), row_blocks)
    n_splits = max(1, min(int(n_splits), granules))
    cols = triton.cdiv(granules, n_splits) * granule
    return triton.cdiv(d_sae, cols), cols


def _check(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor) -> None:
    if a.dtype != W_enc.dtype:
        raise TypeError(f"encoder input is {a.dtype} but W_enc is {W_enc.dtype}")
    if a.shape[1] != W_enc.shape[0] or bias.shape[0] != W_enc.shape[1]:
        raise ValueError(f"shapes do not agree: a {tuple(a.shape)}, W_enc {tuple(W_enc.shape)}, bias {tuple(bias.shape)}")


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
        n_splits: d_sae splits (default: enough programs to fill the device).
        deterministic: a fixed tile configuration instead of the autotuned one (the values
            then never depend on which configuration won a tuning run).
        queue: filter each tile against the running k-th best into a per-row candidate
            queue and merge only when it fills (default on a GPU when d_sae is large enough
            for the filter to pay); False merges every tile. The result is the same either way.

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
    KP = next_pow2(K)
    a = a.contiguous()
    W_enc = W_enc if W_enc.stride(1) == 1 else W_enc.contiguous()
    S, cols = plan_splits(n, d_sae, n_splits)
    part = torch.empty((n, S, KP), dtype=torch.int64, device=a.device)
    if queue is None:  # (the interpreter's wide tiles make queues slow to simulate)
        queue = d_sae > 4 * max(KP, 64) and not interpreting()
    # queue row length: a whole tile (the widest any configuration may use) fits above the
    # flush mark; one queue row per (program, tile row), at most (n + BM - 1) * S of them
    max_bn = max(c.kwargs["BN"] for c in encode_configs()) if not interpreting() else None
    if max_bn is None:
        max_bn = fixed_config(KP, cols, n)[0]["BN"]
    max_bn = max(max_bn, KP)
    qstride = max_bn + max(KP, 64) if queue else 1
    scratch = torch.empty((n + 256) * S * qstride if queue else 1, dtype=torch.int64, device=a.device)
    upcast, prec = _precision(a.dtype)
    scale = dec_norm if dec_norm is not None else bias
    args = (a, W_enc, bias, scale, part, scratch, n, d_in, d_sae, cols, a.stride(0), W_enc.stride(0), S * KP)
    flags = dict(HAS_SCALE=dec_norm is not None, KP=KP, QUEUED=bool(queue), QSTRIDE=qstride, UPCAST=upcast, PREC=prec)
    if deterministic or interpreting():
        meta, warps, stages = fixed_config(KP, cols, n)
        flags["ALIGNED"] = cols % meta["BN"] == 0
        grid = (triton.cdiv(n, meta["BM"]) * S,)
        _encode_topk_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (triton.cdiv(n, m["BM"]) * S,)  # noqa: E731
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
    S, cols = plan_splits(n, d_sae, n_splits)
    sentinel = torch.iinfo(torch.int32).max
    out_idx = torch.full((n, cap), sentinel, dtype=torch.int32, device=a.device)
    out_val = torch.zeros((n, cap), dtype=torch.float32, device=a.device)
    count = torch.zeros(n, dtype=torch.int32, device=a.device)
    upcast, prec = _precision(a.dtype)
    scale = dec_norm if dec_norm is not None else bias
    args = (a, W_enc, bias, scale, thr, out_idx, out_val, count, n, d_in, d_sae, cols, cap,
            a.stride(0), W_enc.stride(0))
    flags = dict(HAS_SCALE=dec_norm is not None, OFF64=n * cap >= 2**31, UPCAST=upcast, PREC=prec)
    if deterministic or interpreting():
        meta, warps, stages = fixed_config(1, cols, n)
        flags["ALIGNED"] = cols % meta["BN"] == 0
        grid = (triton.cdiv(n, meta["BM"]) * S,)
        _encode_threshold_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (triton.cdiv(n, m["BM"]) * S,)  # noqa: E731
        _threshold_tuned[grid](*args, **flags, ALIGNED=True)
    # Slot order depends on which split reserved first: sort by latent index.
    idx_sorted, order = out_idx.sort(dim=1)
    vals = out_val.gather(1, order)
    empty = idx_sorted == sentinel
    idx = torch.where(empty, torch.full_like(idx_sorted, -1), idx_sorted).to(torch.int64)
    vals = torch.where(empty, torch.zeros_like(vals), vals)
    return vals, idx, count.to(torch.int64)
