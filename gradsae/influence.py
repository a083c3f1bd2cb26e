"""The influence op: activation x gradient for the active latents of an SAE.

    out = influence(x, grad, sae)

For every token row of ``x`` (the hook's input, ``[..., d_in]``) and ``grad`` (dY/d hook output,
same shape), the SAE's active latents ``j`` get

    acts[.., s]   = z[j]                      the latent's activation
    grads[.., s]  = dY/dz[j] = row_scale * col_scale_j * (W_dec[j] . grad)
    scores[.., s] = acts * grads              GradSAE's first-order influence of latent j

in ``K`` slots per row, ``indices[.., s] = j`` (-1 marks an empty slot). No dense
``[tokens, d_sae]`` activation or gradient tensor is built by any backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import Request, choose_backend, choose_backend_with
from .errors import InputError
from .sae import SAE


@dataclass
class Influence:
    """Sparse per-token influence of the active latents; every field is ``[..., K]``.

    ``indices`` (int64, -1 = empty slot), ``acts`` (z), ``grads`` (dY/dz), ``scores``
    (acts * grads). The order of slots within a row depends on the backend; use
    :meth:`canonical` to compare results.
    """

    indices: torch.Tensor
    acts: torch.Tensor
    grads: torch.Tensor
    scores: torch.Tensor
    d_sae: int

    @property
    def K(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape

    @property
    def active(self) -> torch.Tensor:
        """Boolean mask of filled slots."""
        return self.indices >= 0

    def canonical(self) -> "Influence":
        """Slots sorted by latent index, empty slots last (a backend-independent order)."""
        key = torch.where(self.indices >= 0, self.indices, torch.full_like(self.indices, self.d_sae))
        order = key.argsort(dim=-1, stable=True)
        take = lambda t: t.gather(-1, order)  # noqa: E731
        return Influence(take(self.indices), take(self.acts), take(self.grads), take(self.scores), self.d_sae)

    def to_dense(self, field: str = "scores") -> torch.Tensor:
        """Scatter ``field`` (``scores``, ``acts`` or ``grads``) into a dense ``[..., d_sae]``
        tensor. For inspection and tests only: this is the tensor the op avoids."""
        vals = getattr(self, field)
        out = torch.zeros(*self.indices.shape[:-1], self.d_sae + 1, dtype=vals.dtype, device=vals.device)
        idx = torch.where(self.indices >= 0, self.indices, torch.full_like(self.indices, self.d_sae))
        out.scatter_add_(-1, idx, torch.where(self.indices >= 0, vals, torch.zeros_like(vals)))
        return out[..., : self.d_sae]

    def to(self, device) -> "Influence":
        """The same result on ``device``."""
        return Influence(
            self.indices.to(device), self.acts.to(device), self.grads.to(device), self.scores.to(device), self.d_sae
        )


def _as_sae(sae) -> SAE:
    if isinstance(sae, SAE):
        return sae
    try:
        return SAE.from_object(sae)
    except Exception as e:  # pragma: no cover - message path
        raise InputError(f"sae must be a gradsae.SAE (or a supported library object): {e}") from e


def _check_tensor(name: str, t, sae: SAE) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() == 0 or t.shape[-1] != sae.d_in:
        raise InputError(
            f"{name} has shape {tuple(t.shape)}; its last dimension must be the SAE's d_in={sae.d_in}"
        )
    if t.device != sae.device:
        raise InputError(
            f"{name} is on {t.device} but the SAE is on {sae.device}; move one of them with .to()"
        )


def _resolve_k(sae: SAE, k) -> int | None:
    if k is None:
        return sae.k  # topk: the SAE's k; threshold: sized to the fullest row
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an int or None, got {k!r}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    return k


def _prepare(x, grad, sae, k, check_finite: bool):
    sae = _as_sae(sae)
    _check_tensor("x", x, sae)
    if grad is not None:
        _check_tensor("grad", grad, sae)
        if grad.shape != x.shape:
            raise InputError(f"x has shape {tuple(x.shape)} but grad has shape {tuple(grad.shape)}")
        if grad.dtype != x.dtype:
            raise InputError(f"x is {x.dtype} but grad is {grad.dtype}; pass both in one dtype")
    K = _resolve_k(sae, k)
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, sae.d_in)
    g2 = grad.detach().reshape(-1, sae.d_in) if grad is not None else None
    if check_finite and x2.numel():
        if not torch.isfinite(x2).all():
            raise InputError("x contains NaN or infinite values")
        if g2 is not None and not torch.isfinite(g2).all():
            raise InputError("grad contains NaN or infinite values")
    return sae, K, lead, x2, g2


def _empty(sae: SAE, lead, K: int | None, with_grad: bool):
    K = K if K is not None else 0
    acc = torch.promote_types(sae.dtype, torch.float32)
    idx = torch.full((*lead, K), -1, dtype=torch.int64, device=sae.device)
    z = torch.zeros((*lead, K), dtype=acc, device=sae.device)
    return idx, z


def influence(
    x: torch.Tensor,
    grad: torch.Tensor,
    sae,
    k: int | None = None,
    backend: str = "auto",
    *,
    check_finite: bool = True,
    deterministic: bool = False,
) -> Influence:
    """Activation x gradient of the SAE's active latents, without dense latents.

    Args:
        x: the hook's input (what the SAE encodes), ``[..., d_in]``.
        grad: dY/d(hook output), ``[..., d_in]``, same shape and dtype as ``x``.
        sae: a :class:`gradsae.SAE` (or a live SAELens / sparsify / dictionary_learning SAE).
        k: slots per row. TopK SAEs: default the SAE's ``k`` (a different value overrides
            how many latents are kept). Threshold SAEs (jumprelu/relu): a capacity; a row with
            more active latents raises :class:`CapacityError`; ``None`` sizes the output to
            the fullest row.
        backend: ``"auto"`` (first capable in priority order) or a name from
            :func:`gradsae.available_backends`.
        check_finite: reject NaN/inf in ``x`` and ``grad`` (one cheap pass over the inputs).
        deterministic: require bitwise reproducible results from the backend.

    Returns:
        :class:`Influence` with ``indices``, ``acts``, ``grads``, ``scores`` of shape
        ``[..., K]``; values in float32 (float64 for a float64 SAE).
    """
    sae, K, lead, x2, g2 = _prepare(x, grad, sae, k, check_finite)
    if grad is None:
        raise InputError("grad is required; use SAE.encode_sparse for selection alone")
    if x2.shape[0] == 0:
        idx, z = _empty(sae, lead, K, True)
        return Influence(idx, z, z.clone(), z.clone(), sae.d_sae)
    req = Request(x2, g2, sae, K, deterministic=deterministic)
    b = choose_backend(req, backend)
    idx, acts, grads = b.influence(req)
    K = idx.shape[-1]
    shape = (*lead, K)
    idx, acts, grads = idx.reshape(shape), acts.reshape(shape), grads.reshape(shape)
    return Influence(idx, acts, grads, acts * grads, sae.d_sae)


def encode_sparse(x: torch.Tensor, sae, k: int | None = None, backend: str = "auto", *, check_finite: bool = True):
    """Sparse latents ``(indices, values)``, ``[..., K]`` each, -1 / 0 in empty slots.
    ``k`` as in :func:`influence`."""
    sae, K, lead, x2, _ = _prepare(x, None, sae, k, check_finite)
    if x2.shape[0] == 0:
        return _empty(sae, lead, K, False)
    req = Request(x2, None, sae, K)
    b = choose_backend(req, backend)
    idx, acts = b.select(req)
    shape = (*lead, idx.shape[-1])
    return idx.reshape(shape), acts.reshape(shape)


def influence_at(
    indices: torch.Tensor,
    acts: torch.Tensor,
    grad: torch.Tensor,
    sae,
    x: torch.Tensor | None = None,
    backend: str = "auto",
) -> Influence:
    """Influence of an active set that is already known (e.g. from the forward pass of a
    spliced model): only the gather-dot ``grads = row_scale * col_scale * (W_dec[idx] . grad)``
    and ``scores = acts * grads`` are computed, no encode.

    Args:
        indices, acts: ``[..., K]`` as returned by :func:`encode_sparse` (-1 = empty).
        grad: dY/d(hook output), ``[..., d_in]``.
        x: the input the latents came from; needed only for SAEs with input normalisation.
        backend: the backend whose gather-dot runs (one without one falls back to the
            reference implementation).
    """
    sae = _as_sae(sae)
    _check_tensor("grad", grad, sae)
    if indices.shape[:-1] != grad.shape[:-1] or acts.shape != indices.shape:
        raise InputError(
            f"indices {tuple(indices.shape)}, acts {tuple(acts.shape)} and grad {tuple(grad.shape)} "
            "must share their leading dimensions"
        )
    K = indices.shape[-1]
    idx2 = indices.reshape(-1, K)
    d2 = grad.detach().reshape(-1, sae.d_in)
    row_scale = None
    if sae.normalize_activations != "none":
        if x is None:
            raise InputError(f"this SAE normalises its input ({sae.normalize_activations}); pass x")
        row_scale = sae.norm_state(x.reshape(-1, sae.d_in)).row_scale
    b = choose_backend_with(Request(d2, d2, sae, K), "gather_dot", backend)
    if b is not None:
        fn = b.gather_dot
    else:
        from .backends.reference import gather_dot as fn
    g = fn(sae.W_dec, idx2, d2, row_scale, sae.col_scale()).reshape(indices.shape)
    acc = g.dtype
    a = acts.to(acc) * (indices >= 0)
    return Influence(indices, a, g, a * g, sae.d_sae)
