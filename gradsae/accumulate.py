"""Corpus statistics straight from the influence op: ``accumulate_influence``.

    stats = accumulate_influence(x, grad, sae, stats)

adds the GradSAE scores of every active latent in ``x`` to a :class:`LatentStats`. A backend
with a fused ``accumulate`` (Triton: the gather-dot adds into the per-latent tables) never
returns the per-token scores; any other backend computes :func:`gradsae.influence` and
``stats.update`` does the rest. Both give the same statistics.
"""

from __future__ import annotations

import torch

from .backends import Request, choose_backend
from .errors import InputError
from .influence import Influence, _prepare
from .stats import LatentStats


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
    sae, K, lead, x2, g2 = _prepare(x, grad, sae, k, check_finite)
    if grad is None:
        raise InputError("grad is required")
    if stats is None:
        stats = LatentStats(sae.d_sae, device=sae.device)
    if stats.d_sae != sae.d_sae:
        raise InputError(f"stats have d_sae={stats.d_sae} but the SAE has d_sae={sae.d_sae}")
    flat_mask = None
    if mask is not None:
        if tuple(mask.shape) != tuple(lead):
            raise InputError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead)}")
        flat_mask = mask.reshape(-1).to(device=x2.device, dtype=torch.bool)
    if x2.shape[0] == 0:
        return stats
    req = Request(x2, g2, sae, K, deterministic=deterministic)
    b = choose_backend(req, backend)
    fused = getattr(b, "accumulate", None)
    if fused is not None:
        fused(req, stats, flat_mask)
        return stats
    idx, acts, grads = b.influence(req)
    inf = Influence(idx, acts, grads, acts * grads, sae.d_sae)
    stats.update(inf, flat_mask, deterministic=deterministic)
    return stats
