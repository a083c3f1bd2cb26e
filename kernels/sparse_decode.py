"""Sparse decode (embedding-bag style): the splice forward without dense latents.

    x_hat[n] = sum_s  acts[n, s] * col_scale[idx[n, s]] * W_dec[idx[n, s]]  +  b_dec

One program per (token row, d_in block) gathers the row's K decoder rows and reduces them
in fp32. :class:`SparseDecode` makes it differentiable in ``acts``: its backward is the
gather-dot (dL/dacts = col_scale * (W_dec[idx] . dL/dx_hat)), so a spliced model gets the
latents' gradients, and with them the GradSAE scores, without a dense backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gather_dot import gather_dot
from .tuning import interpreting, next_pow2


@triton.jit
def _sparse_decode_kernel(W, IDX, VAL, COL_SCALE, BIAS, OUT, K, D_IN, stride_w,
                          HAS_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BS: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = ds < D_IN
    acc = tl.zeros([BD], dtype=tl.float32)
    for s0 in range(0, K, BS):
        slots = s0 + tl.arange(0, BS)
        s_ok = slots < K
        j = tl.load(IDX + row * K + slots, mask=s_ok, other=-1)
        valid = j >= 0
        jj = tl.where(valid, j, 0).to(tl.int64)
        a = tl.where(valid, tl.load(VAL + row * K + slots, mask=s_ok, other=0.0).to(tl.float32), 0.0)
        if HAS_COL:
            a = a * tl.load(COL_SCALE + jj, mask=valid, other=0.0)
        w = tl.load(W + jj[:, None] * stride_w + ds[None, :], mask=valid[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(BIAS + ds, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * D_IN + ds, acc.to(OUT.dtype.element_ty), mask=d_ok)


def sparse_decode(W_dec: torch.Tensor, idx: torch.Tensor, acts: torch.Tensor,
                  b_dec: torch.Tensor | None = None, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x_hat = (acts * col_scale[idx]) @ W_dec[idx] + b_dec`` per row, no dense latents.

    Args:
        W_dec: ``[d_sae, d_in]``; idx: ``[N, K]`` (-1 = empty); acts: ``[N, K]``.
        b_dec: ``[d_in]`` or None; col_scale: ``[d_sae]`` float32 or None.

    Returns:
        ``[N, d_in]`` in W_dec's dtype (accumulated in fp32).
    """
    n, K = idx.shape
    d_in = W_dec.shape[1]
    out = torch.empty((n, d_in), dtype=W_dec.dtype, device=W_dec.device)
    if n == 0:
        return out
    W_dec = W_dec if W_dec.stride(1) == 1 else W_dec.contiguous()
    dummy = out
    bs = min(32, next_pow2(max(K, 1)))
    bd = min(128 if interpreting() else 256, next_pow2(d_in))
    grid = (n, triton.cdiv(d_in, bd))
    _sparse_decode_kernel[grid](
        W_dec, idx.contiguous(), acts.detach().contiguous(),
        col_scale.to(torch.float32).contiguous() if col_scale is not None else dummy,
        b_dec.contiguous() if b_dec is not None else dummy, out, K, d_in, W_dec.stride(0),
        HAS_COL=col_scale is not None, HAS_BIAS=b_dec is not None, BS=bs, BD=bd,
        num_warps=1 if interpreting() else 4,
    )
    return out


class SparseDecode(torch.autograd.Function):
    """Differentiable sparse decode in ``acts`` (the SAE's weights are frozen)."""

    @staticmethod
    def forward(ctx, idx, acts, W_dec, b_dec, col_scale):
        ctx.save_for_backward(idx, W_dec, col_scale if col_scale is not None else torch.empty(0))
        ctx.has_col = col_scale is not None
        ctx.acts_dtype = acts.dtype
        return sparse_decode(W_dec, idx, acts, b_dec, col_scale)

    @staticmethod
    def backward(ctx, grad_out):
        idx, W_dec, col_scale = ctx.saved_tensors
        g = gather_dot(W_dec, idx, grad_out, None, col_scale if ctx.has_col else None)
        return None, g.to(ctx.acts_dtype), None, None, None
