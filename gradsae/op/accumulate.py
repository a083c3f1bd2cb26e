"""Corpus statistics straight from the influence op: ``accumulate_influence``.

    stats = accumulate_influence(x, grad, sae, stats)

adds the GradSAE scores of every active latent in ``x`` to a :class:`LatentStats`. A backend
with a fused ``accumulate`` (the gather-dot adds into the per-latent tables) never returns the
per-token scores; with any other backend the op computes the influence and
``stats.update`` does the rest. Both give the same statistics.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..stats import LatentStats
from .capacity import run_sized
from .dispatch import choose_backend
from .strategy import choose as choose_strategy
from .api import Influence, prepare


def _fusable(stats: LatentStats, device: torch.device) -> bool:
    """The tables can take a fused update in place: on ``device``, contiguous, int64 count
    and float64 sums."""
    return all(
        t.device == device and t.is_contiguous() and t.dtype == (torch.int64 if f == "count" else torch.float64)
        for f, t in stats.to_dict().items()
    )


def accumulate_influence(
    x: torch.Tensor,
    grad: torch.Tensor,
    sae,
    stats: LatentStats | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    *,
    k: int | None = None,
    check_finite: bool = True,
) -> LatentStats:
    """Add the influence of ``x`` / ``grad`` on ``sae``'s latents into ``stats``.

    Args:
        x, grad: ``[..., d_in]``, as for :func:`gradsae.influence`.
        sae: a :class:`gradsae.SAE` (or a supported library object).
        stats: the statistics to update in place; a new one on the SAE's device if None.
        mask: boolean, ``x``'s leading shape: the rows that count (e.g. non-padding tokens).
        backend: ``"auto"`` or a backend name.
        deterministic: bitwise reproducible sums (no floating-point atomics).
        k: slots per row, as for :func:`gradsae.influence` (threshold SAEs: capacity).
        check_finite: reject NaN/inf inputs.

    Returns:
        ``stats`` (updated).
    """
    if grad is None:
        raise InputError("grad is required")
    p = prepare(x, grad, sae, k, check_finite)
    sae = p.sae
    if stats is None:
        stats = LatentStats(sae.d_sae, device=sae.device)
    if stats.d_sae != sae.d_sae:
        raise InputError(f"stats have d_sae={stats.d_sae} but the SAE has d_sae={sae.d_sae}")
    flat_mask = None
    if mask is not None:
        if tuple(mask.shape) != tuple(p.lead):
            raise InputError(f"mask has shape {tuple(mask.shape)}, expected {tuple(p.lead)}")
        flat_mask = mask.reshape(-1).to(device=p.x.device, dtype=torch.bool)
    if p.x.shape[0] == 0:
        return stats
    req = p.request(backend, deterministic)
    b = choose_backend(req, backend)
    req = choose_strategy(b, req)
    if not hasattr(b, "accumulate"):
        inf = Influence.from_selection(run_sized(b.influence, req), (p.x.shape[0],), sae.d_sae)
        return stats.update(inf, flat_mask, deterministic=deterministic)
    sel = run_sized(b.select, req)
    dev = p.x.device
    # Tables kept elsewhere (e.g. on the CPU, or in float32) take the update on the device
    # first and are merged after.
    target = stats if _fusable(stats, dev) else LatentStats(sae.d_sae, device=dev)
    b.accumulate(req, sel, target.to_dict(), flat_mask.contiguous() if flat_mask is not None else None)
    rows = int(flat_mask.sum()) if flat_mask is not None else p.x.shape[0]
    target.tokens += rows
    if target is not stats:
        stats.merge(target)
    return stats
