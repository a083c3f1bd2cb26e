"""Gather-dot + score: dY/dz for the active latents only.

    g[n, s]     = row_scale[n] * col_scale[idx[n, s]] * (W_dec[idx[n, s]] . D[n])   (0 where idx < 0)
    score[n, s] = act[n, s] * g[n, s]

One program per (token row, block of slots) streams the row's gradient and the gathered
decoder rows over d_in in fp32. With ``stats`` the program also adds each slot's
count / act / score / relu(score) / |score| / max(score) into per-latent float64 tables with
atomics (the fused LatentStats update); :mod:`.stats` has the deterministic variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradsae.stats import FIELDS  # absolute: see encode_select.py
from .tuning import interpreting, next_pow2


@triton.jit
def _gather_dot_kernel(W, IDX, D, ACT, ROW_SCALE, COL_SCALE, ROW_MASK, G_OUT, S_OUT,
                       CNT, ASUM, SSUM, RSUM, XSUM, SMAX,
                       K, D_IN, stride_w, stride_d,
                       HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_ACT: tl.constexpr,
                       HAS_MASK: tl.constexpr, WRITE: tl.constexpr, STATS: tl.constexpr,
                       BS: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BS + tl.arange(0, BS)
    s_ok = slots < K
    j = tl.load(IDX + row * K + slots, mask=s_ok, other=-1)
    valid = j >= 0
    jj = tl.where(valid, j, 0).to(tl.int64)
    acc = tl.zeros([BS], dtype=tl.float32)
    ds = tl.arange(0, BD)
    for d0 in range(0, D_IN, BD):
        d_ok = (d0 + ds) < D_IN
        dv = tl.load(D + row * stride_d + d0 + ds, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(W + jj[:, None] * stride_w + d0 + ds[None, :], mask=valid[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * dv[None, :], axis=1)
    if HAS_ROW:
        acc = acc * tl.load(ROW_SCALE + row).to(tl.float32)
    if HAS_COL:
        acc = acc * tl.load(COL_SCALE + jj, mask=valid, other=0.0)
    g = tl.where(valid, acc, 0.0)
    if WRITE:
        tl.store(G_OUT + row * K + slots, g, mask=s_ok)
    if HAS_ACT:
        a = tl.where(valid, tl.load(ACT + row * K + slots, mask=s_ok, other=0.0), 0.0)
        score = a * g
        if WRITE:
            tl.store(S_OUT + row * K + slots, score, mask=s_ok)
        if STATS:
            use = valid
            if HAS_MASK:
                use = use & (tl.load(ROW_MASK + row) != 0)
            s64 = score.to(tl.float64)
            tl.atomic_add(CNT + jj, tl.full([BS], 1, dtype=tl.int64), mask=use)
            tl.atomic_add(ASUM + jj, a.to(tl.float64), mask=use)
            tl.atomic_add(SSUM + jj, s64, mask=use)
            tl.atomic_add(RSUM + jj, tl.maximum(s64, 0.0), mask=use)
            tl.atomic_add(XSUM + jj, tl.abs(s64), mask=use)
            tl.atomic_max(SMAX + jj, s64, mask=use)


def _blocks(K: int, d_in: int) -> tuple[int, int, int]:
    """(slots per program, d_in chunk, warps). On the GPU 16 slots x 256 columns per step keeps
    the gathered tile at 32 values per thread (ptxas: ~128 registers, so several programs
    share an SM and keep many row loads in flight); the interpreter prefers few programs."""
    if interpreting():
        return min(64, next_pow2(max(K, 1))), min(128, next_pow2(d_in)), 1
    return min(16, next_pow2(max(K, 1))), min(256, next_pow2(d_in)), 4


def gather_dot(W_dec: torch.Tensor, idx: torch.Tensor, D: torch.Tensor,
               row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
               acts: torch.Tensor | None = None, *, stats: dict | None = None,
               row_mask: torch.Tensor | None = None, write: bool = True):
    """``g = row_scale * col_scale[idx] * (W_dec[idx] . D)`` for the slots of ``idx``.

    Args:
        W_dec: ``[d_sae, d_in]``; idx: ``[N, K]`` (int32/int64, -1 = empty); D: ``[N, d_in]``.
        row_scale: ``[N]`` or None; col_scale: ``[d_sae]`` or None.
        acts: ``[N, K]`` activations; when given, ``score = acts * g`` is produced too.
        stats: per-latent tables to add into (atomically): a dict with the names of
            :data:`gradsae.stats.FIELDS` (int64 ``count``, float64 sums and max), all
            ``[d_sae]`` on the device. Needs ``acts``.
        row_mask: ``[N]`` bool, rows that count in ``stats``.
        write: return ``g`` (and ``score``); False only updates ``stats``.

    Returns:
        ``g`` float32 ``[N, K]``, or ``(g, score)`` when ``acts`` is given (None when
        ``write`` is False).
    """
    n, K = idx.shape
    d_in = W_dec.shape[1]
    dev = idx.device
    g = torch.zeros((n, K), dtype=torch.float32, device=dev) if write else None
    s = torch.zeros((n, K), dtype=torch.float32, device=dev) if (write and acts is not None) else None
    if stats is not None and acts is None:
        raise ValueError("stats accumulation needs acts")
    if n and K:
        W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
        D = D if D.stride(1) == 1 else D.contiguous()
        idx = idx.contiguous()
        dummy = g if g is not None else torch.zeros(1, dtype=torch.float32, device=dev)
        a = acts.to(torch.float32).contiguous() if acts is not None else dummy
        rs = row_scale.to(torch.float32).contiguous() if row_scale is not None else dummy
        cs = col_scale.to(torch.float32).contiguous() if col_scale is not None else dummy
        rm = row_mask.to(torch.int8).contiguous() if row_mask is not None else dummy
        st = stats or {}
        tables = [st.get(f, dummy) for f in FIELDS]  # the kernel's CNT .. SMAX, in FIELDS order
        bs, bd, warps = _blocks(K, d_in)
        grid = (n, triton.cdiv(K, bs))
        _gather_dot_kernel[grid](
            W_dec, idx, D, a, rs, cs, rm, g if g is not None else dummy, s if s is not None else dummy,
            *tables, K, d_in, W_dec.stride(0), D.stride(0),
            HAS_ROW=row_scale is not None, HAS_COL=col_scale is not None, HAS_ACT=acts is not None,
            HAS_MASK=row_mask is not None, WRITE=write, STATS=stats is not None,
            BS=bs, BD=bd, num_warps=warps,
        )
    if acts is None:
        return g
    return (g, s) if write else None


def aot_spec(p: str):
    """The gather-dot (scores, no statistics) as a GPU launch runs it, for :mod:`.aot`."""
    from .aot import Spec

    bs, bd, warps = 16, 256, 4
    sig = {"W": p, "IDX": "*i64", "D": p, "ACT": "*fp32", "ROW_SCALE": "*fp32", "COL_SCALE": "*fp32",
           "ROW_MASK": "*i8", "G_OUT": "*fp32", "S_OUT": "*fp32", "CNT": "*i64", "ASUM": "*fp64",
           "SSUM": "*fp64", "RSUM": "*fp64", "XSUM": "*fp64", "SMAX": "*fp64", "K": "i32", "D_IN": "i32", "stride_w": "i32",
           "stride_d": "i32"}
    const = dict(HAS_ROW=False, HAS_COL=True, HAS_ACT=True, HAS_MASK=False, WRITE=True, STATS=False,
                 BS=bs, BD=bd)
    sig.update({name: "constexpr" for name in const})
    return Spec("gather_dot", _gather_dot_kernel, sig, const, warps, 3,
                divisible=("K", "D_IN", "stride_w", "stride_d"), meta=dict(BS=bs, BD=bd, dtype=p))
