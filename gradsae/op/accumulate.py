"""Corpus statistics straight from the influence op: ``accumulate_influence`` and
``accumulate_at``.

    stats = accumulate_influence(x, grad, sae, stats)
    inf = accumulate_at(indices, acts, grad, sae, stats)     # the spliced model's backward

add the GradSAE scores of every active latent to a :class:`LatentStats`. A backend with a
fused ``accumulate`` (the gather-dot adds into the per-latent tables) never returns the
per-token scores to be reduced by PyTorch; with any other backend the op computes the
influence and ``stats.update`` does the rest. Both give the same statistics: the same counts
and maxima, sums equal up to float64 rounding (atomics add in another order).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..stats import LatentStats
from .api import Influence, as_sae, check_at, influence_at, prepare
from .capacity import INITIAL_CAPACITY, run_sized
from .contract import Request, Selection
from .dispatch import choose_backend, choose_optional
from .strategy import choose as choose_strategy


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
    _fused(b, req, sel, stats, flat_mask)
    return stats


def _fused(b, req: Request, sel: Selection, stats: LatentStats, mask: torch.Tensor | None,
           keep_grads: bool = False) -> torch.Tensor | None:
    """``b.accumulate`` into ``stats`` (and its tokens). Tables kept elsewhere (e.g. on the
    CPU, or in float32) take the update on the device first and are merged after."""
    dev = req.x.device
    target = stats if _fusable(stats, dev) else LatentStats(stats.d_sae, device=dev)
    g = b.accumulate(req, sel, target.to_dict(), mask.contiguous() if mask is not None else None,
                     keep_grads=keep_grads)
    target.tokens += int(mask.sum()) if mask is not None else req.x.shape[0]
    if target is not stats:
        stats.merge(target)
    return g


def fused_backend(sae, device, backend: str = "auto") -> str | None:
    """The name of the backend whose fused statistics update (:meth:`Backend.accumulate
    <gradsae.op.contract.Accumulate.accumulate>`) serves :func:`accumulate_at` for ``sae`` on
    ``device`` with ``backend``, or None where the op's PyTorch form would serve (then
    ``Influence`` + ``LatentStats.update`` per batch is as good)."""
    sae = as_sae(sae)
    probe_x = torch.empty((1, sae.d_in), dtype=sae.dtype, device=device)
    k = sae.k if sae.activation == "topk" else min(sae.d_sae, INITIAL_CAPACITY)
    probe = Request(probe_x, probe_x, sae, k, explicit=backend != "auto")
    b = choose_optional(probe, "accumulate", backend, strict=False)
    return None if b is None else b.name


def accumulate_at(
    indices: torch.Tensor,
    acts: torch.Tensor,
    grad: torch.Tensor,
    sae,
    stats: LatentStats,
    mask: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Influence:
    """:func:`gradsae.influence_at` that also adds the influence into ``stats``: where a
    backend with a fused ``accumulate`` serves, its gather-dot writes the grads and adds into
    the per-latent tables in one pass (no ``Influence`` reduced by PyTorch); elsewhere
    ``stats.update`` of the result. What a spliced model's backward runs when its recording
    has a statistics sink.

    Args:
        indices, acts, grad, sae, x, backend: as for :func:`gradsae.influence_at`.
        stats: the :class:`LatentStats` to add into (in place).
        mask: boolean, the leading shape of ``indices``: the rows that count in ``stats``
            (e.g. non-padding tokens); the returned influence keeps every row.
        deterministic: bitwise reproducible sums (no floating-point atomics).

    Returns:
        The :class:`Influence` of ``indices``, as :func:`gradsae.influence_at` gives it.
    """
    sae = as_sae(sae)
    if stats.d_sae != sae.d_sae:
        raise InputError(f"stats have d_sae={stats.d_sae} but the SAE has d_sae={sae.d_sae}")
    check_at(indices, acts, grad, sae)
    if mask is not None and tuple(mask.shape) != tuple(indices.shape[:-1]):
        raise InputError(f"mask has shape {tuple(mask.shape)}, expected {tuple(indices.shape[:-1])}")
    K = indices.shape[-1]
    d2 = grad.detach().reshape(-1, sae.d_in)
    probe = Request(d2, d2, sae, K, explicit=backend != "auto", deterministic=deterministic)
    b = choose_optional(probe, "accumulate", backend, strict=False) if indices.numel() else None
    if b is None:
        inf = influence_at(indices, acts, grad, sae, x=x, backend=backend)
        stats.update(inf, mask, deterministic=deterministic)
        return inf
    idx2 = indices.reshape(-1, K)
    row_scale = None
    if sae.normalize_activations != "none":
        if x is None:
            raise InputError(f"this SAE normalises its input ({sae.normalize_activations}); pass x")
        row_scale = sae.norm_state(x.reshape(-1, sae.d_in)).row_scale
    a32 = (acts.reshape(-1, K).float() * (idx2 >= 0)).contiguous()
    sel = Selection(idx2.contiguous(), a32, None, None if row_scale is None else row_scale.float())
    flat_mask = None if mask is None else mask.reshape(-1).to(device=d2.device, dtype=torch.bool)
    g = _fused(b, probe, sel, stats, flat_mask, keep_grads=True).reshape(indices.shape)
    a = a32.reshape(indices.shape).to(g.dtype)
    return Influence(indices, a, g, a * g, sae.d_sae)
