"""Per-latent statistics (LatentStats tables) from sparse influence, in a reproducible order.

The fused gather-dot (:mod:`.gather_dot`) adds into the tables with float64 atomics, whose
order (and so the last bits of the sums) depends on scheduling. :func:`accumulate_sorted` is
the deterministic variant: the active slots are sorted by latent (stably, so token order is
kept inside a latent), and one program per latent reduces its own segment in fixed blocks,
then adds it to the tables without atomics. Results are bitwise repeatable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradsae.stats import FIELDS  # absolute: see encode_select.py
from .tuning import interpreting


@triton.jit
def _segment_reduce_kernel(LAT, START, LEN, ACT, SCORE, CNT, ASUM, SSUM, RSUM, XSUM, SMAX,
                           BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    lat = tl.load(LAT + seg)
    start = tl.load(START + seg)
    length = tl.load(LEN + seg)
    offs = tl.arange(0, BLOCK)
    a_acc = tl.zeros([BLOCK], dtype=tl.float64)
    s_acc = tl.zeros([BLOCK], dtype=tl.float64)
    r_acc = tl.zeros([BLOCK], dtype=tl.float64)
    x_acc = tl.zeros([BLOCK], dtype=tl.float64)
    m_acc = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    for i in range(0, length, BLOCK):
        ok = (i + offs) < length
        a = tl.load(ACT + start + i + offs, mask=ok, other=0.0).to(tl.float64)
        s = tl.load(SCORE + start + i + offs, mask=ok, other=0.0).to(tl.float64)
        a_acc += a
        s_acc += s
        r_acc += tl.maximum(s, 0.0)
        x_acc += tl.abs(s)
        m_acc = tl.where(ok, tl.maximum(m_acc, s), m_acc)
    tl.store(CNT + lat, tl.load(CNT + lat) + length)
    tl.store(ASUM + lat, tl.load(ASUM + lat) + tl.sum(a_acc, axis=0))
    tl.store(SSUM + lat, tl.load(SSUM + lat) + tl.sum(s_acc, axis=0))
    tl.store(RSUM + lat, tl.load(RSUM + lat) + tl.sum(r_acc, axis=0))
    tl.store(XSUM + lat, tl.load(XSUM + lat) + tl.sum(x_acc, axis=0))
    tl.store(SMAX + lat, tl.maximum(tl.load(SMAX + lat), tl.max(m_acc, axis=0)))


def accumulate_sorted(tables: dict, idx: torch.Tensor, acts: torch.Tensor, scores: torch.Tensor,
                      row_mask: torch.Tensor | None = None) -> None:
    """Add the active slots of ``(idx, acts, scores)`` (``[N, K]``, -1 = empty) into
    ``tables`` (int64 ``count`` and float64 sums / max, ``[d_sae]``, by the names of
    :data:`gradsae.stats.FIELDS`, the order the kernel takes them in),
    deterministically. ``row_mask`` ``[N]`` selects the rows that count."""
    valid = idx >= 0
    if row_mask is not None:
        valid &= row_mask.to(torch.bool)[:, None]
    j = idx[valid]
    if j.numel() == 0:
        return
    a = acts[valid].to(torch.float32)
    s = scores[valid].to(torch.float32)
    j_sorted, order = torch.sort(j, stable=True)
    a, s = a[order].contiguous(), s[order].contiguous()
    lat, length = torch.unique_consecutive(j_sorted, return_counts=True)
    start = torch.cumsum(length, 0) - length
    block = 64 if interpreting() else 256
    _segment_reduce_kernel[(lat.numel(),)](
        lat, start, length, a, s, *(tables[f] for f in FIELDS), BLOCK=block,
        num_warps=1 if interpreting() else 4,
    )
