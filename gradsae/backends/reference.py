"""The reference backend: plain PyTorch, any device, memory-bounded. The correctness oracle
for the kernels and the CPU path.

Memory stays bounded by a fixed element budget, whatever the number of tokens or latents:
- the encode runs over token chunks and, inside each, over d_sae chunks; a TopK SAE keeps a
  running top-k (per-chunk top-k merged into the best so far), a threshold SAE compacts the
  active entries of each chunk (only active latents are ever stored) into the request's
  ``k`` slots and counts every row's active latents (the op sizes the slots);
- the gather-dot ``W_dec[idx] . grad`` runs over row sub-chunks so the gathered rows never
  exceed the budget either.
No [tokens, d_sae] tensor larger than one chunk is allocated.
"""

from __future__ import annotations

import torch

from ..op.contract import Request, Selection, acc_dtype

# Elements of the largest temporary (a [rows, d_sae-chunk] block or a [rows, K, d_in] gather).
# 2^22 fp32 elements = 16 MiB.
DEFAULT_BUDGET = 1 << 22


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _plan(n: int, d_sae: int, budget: int) -> tuple[int, int]:
    """(token rows, d_sae columns) per encode block, their product within ``budget``."""
    cols = min(d_sae, max(1024, budget // max(1, min(n, 512))))
    rows = max(1, min(n, budget // cols))
    return rows, cols


# Columns per group of the top-k prefilter (see _row_topk).
TOPK_GROUP = 8


def _row_topk(v: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-K of a ``[rows, cols]`` block, equal to ``v.topk(K)`` up to ties.

    The columns are split into ``TOPK_GROUP`` interleaved slices; a vectorised element-wise max
    across the slices gives each *group* of columns ``{c, c + n, c + 2n, ...}`` its maximum.
    Every member of the row's top-K lies in one of the K groups with the largest maxima (a
    group outside them has K groups above it, each holding a larger element), so a top-K over
    those ``K * TOPK_GROUP`` candidates is exact, and cheaper than a top-K over the whole row.
    """
    rows, cols = v.shape
    n = cols // TOPK_GROUP
    if n < 4 * K:
        return v.topk(K, dim=-1)
    main = n * TOPK_GROUP
    gmax = v[:, :main].unflatten(1, (TOPK_GROUP, n)).amax(1)
    groups = gmax.topk(K, dim=-1, sorted=False).indices
    cand = (groups.unsqueeze(-1) + torch.arange(0, main, n, device=v.device)).flatten(1)
    if main < cols:
        cand = torch.cat([cand, torch.arange(main, cols, device=v.device).expand(rows, -1)], 1)
    vals, pos = v.gather(1, cand).topk(K, dim=-1)
    return vals, cand.gather(1, pos)


def _select_topk(sae, sae_in: torch.Tensor, K: int, cols: int):
    """Running top-K over d_sae chunks. Returns (values v, indices), [rows, K]."""
    best_v = best_i = None
    dec_norm = sae.decoder_norm() if sae.rescale_acts_by_decoder_norm else None
    for c0, c1 in _chunks(sae.d_sae, cols):
        v = torch.addmm(sae.b_enc[c0:c1], sae_in, sae.W_enc[:, c0:c1])
        if dec_norm is not None:
            v = v * dec_norm[c0:c1].to(v.dtype)
        v.masked_fill_(torch.isnan(v), float("-inf"))  # NaN is never selected (torch.topk ranks it first)
        tv, ti = _row_topk(v, min(K, c1 - c0))
        ti = ti + c0
        if best_v is None:
            best_v, best_i = tv, ti
        else:
            cat_v = torch.cat([best_v, tv], dim=-1)
            cat_i = torch.cat([best_i, ti], dim=-1)
            keep = min(K, cat_v.shape[-1])
            best_v, pos = cat_v.topk(keep, dim=-1)
            best_i = cat_i.gather(-1, pos)
    acts = best_v.relu()
    idx = torch.where(acts > 0, best_i, torch.full_like(best_i, -1))
    return acts, idx


def _select_threshold(sae, sae_in: torch.Tensor, cols: int, capacity: int):
    """Active entries ``v > max(threshold, 0)``, compacted per row in ascending latent order.

    Returns (values, indices, counts): the first ``capacity`` active entries of every row in
    ``[rows, capacity]`` slots, and every row's number of active entries (which may exceed
    ``capacity``: the op then retries or raises).
    """
    thr = sae.selection_threshold()
    dec_norm = sae.decoder_norm() if sae.rescale_acts_by_decoder_norm else None
    rows = sae_in.shape[0]
    rr, cc, vv = [], [], []
    for c0, c1 in _chunks(sae.d_sae, cols):
        v = torch.addmm(sae.b_enc[c0:c1], sae_in, sae.W_enc[:, c0:c1])
        if dec_norm is not None:
            v = v * dec_norm[c0:c1].to(v.dtype)
        mask = v > thr[c0:c1].to(v.dtype)
        r, c = mask.nonzero(as_tuple=True)
        rr.append(r)
        cc.append(c + c0)
        vv.append(v[r, c])
    r = torch.cat(rr)
    c = torch.cat(cc)
    v = torch.cat(vv)
    order = torch.argsort(r, stable=True)  # rows grouped; columns stay ascending within a row
    r, c, v = r[order], c[order], v[order]
    counts = torch.bincount(r, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(r.numel(), device=r.device) - starts[r]
    fit = slot < capacity
    r, c, v, slot = r[fit], c[fit], v[fit], slot[fit]
    idx = torch.full((rows, capacity), -1, dtype=torch.int64, device=sae_in.device)
    acts = torch.zeros((rows, capacity), dtype=sae_in.dtype, device=sae_in.device)
    idx[r, slot] = c
    acts[r, slot] = v
    return acts, idx, counts


def gather_dot(
    W_dec: torch.Tensor,
    idx: torch.Tensor,
    D: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """``g[n, s] = row_scale[n] * col_scale[idx] * (W_dec[idx[n, s]] . D[n])``, 0 where idx < 0.

    Computed in float32 (or float64 for float64 inputs) over row sub-chunks, so the gathered
    ``[rows, K, d_in]`` block stays within ``budget`` elements.
    """
    n, K = idx.shape
    acc = acc_dtype(W_dec.dtype)
    out = torch.zeros((n, K), dtype=acc, device=idx.device)
    if n == 0 or K == 0:
        return out
    safe = idx.clamp(min=0)
    step = max(1, budget // max(1, K * W_dec.shape[1]))
    for r0, r1 in _chunks(n, step):
        w = W_dec.index_select(0, safe[r0:r1].flatten()).view(r1 - r0, K, -1).to(acc)  # [rows, K, d_in]
        out[r0:r1] = torch.bmm(w, D[r0:r1].to(acc).unsqueeze(-1)).squeeze(-1)
    if row_scale is not None:
        out *= row_scale.to(acc).unsqueeze(-1)
    if col_scale is not None:
        out *= col_scale.to(acc)[safe]
    out.masked_fill_(idx < 0, 0)
    return out


class ReferenceBackend:
    """Memory-bounded PyTorch implementation; serves every input on every device."""

    name = "reference"

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget

    def unsupported(self, req: Request) -> str | None:
        return None

    def _run(self, req: Request, with_grad: bool) -> Selection:
        sae = req.sae
        n = req.n
        acc = acc_dtype(sae.dtype)
        rows, cols = _plan(n, sae.d_sae, self.budget)
        idx_parts, act_parts, count_parts, grad_parts, scale_parts = [], [], [], [], []
        for r0, r1 in _chunks(n, rows):
            sae_in, state = sae.preprocess(req.x[r0:r1])
            if sae.activation == "topk":
                acts, idx = _select_topk(sae, sae_in, min(req.k, sae.d_sae), cols)
            else:
                acts, idx, counts = _select_threshold(sae, sae_in, cols, req.k)
                count_parts.append(counts)
            idx_parts.append(idx)
            act_parts.append(acts.to(acc))
            scale_parts.append(state.row_scale)
            if with_grad:
                # The gather is bound by random reads of W_dec rows, not block size: a block
                # that stays in cache (1/16 of the budget) is as fast and far smaller.
                grad_parts.append(
                    gather_dot(sae.W_dec, idx, req.grad[r0:r1], state.row_scale, sae.col_scale(),
                               max(1, self.budget // 16))
                )
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts)  # noqa: E731
        return Selection(
            cat(idx_parts), cat(act_parts),
            counts=cat(count_parts) if count_parts else None,
            row_scale=None if scale_parts[0] is None else cat(scale_parts),
            grads=cat(grad_parts) if with_grad else None,
        )

    def select(self, req: Request) -> Selection:
        return self._run(req, with_grad=False)

    def influence(self, req: Request) -> Selection:
        return self._run(req, with_grad=True)

    def gather_dot(self, W_dec, idx, D, row_scale=None, col_scale=None) -> torch.Tensor:
        """See :meth:`gradsae.op.Backend.gather_dot`; rows in blocks within the budget."""
        return gather_dot(W_dec, idx, D, row_scale, col_scale, self.budget)


BACKEND = ReferenceBackend()
