"""The influence op: activation x gradient for the active latents of an SAE.

    out = influence(x, grad, sae)

For every token row of ``x`` (the hook's input, ``[..., d_in]``) and ``grad`` (dY/d hook output,
same shape), the SAE's active latents ``j`` get

    acts[.., s]   = z[j]                      the latent's activation
    grads[.., s]  = dY/dz[j] = row_scale * col_scale_j * (W_dec[j] . grad)
    scores[.., s] = acts * grads              GradSAE's first-order influence of latent j

in ``K`` slots per row, ``indices[.., s] = j`` (-1 marks an empty slot). No dense
``[tokens, d_sae]`` activation or gradient tensor is built by any backend.

Inputs are cast to the SAE's dtype before encoding: a float64 ``x`` with a float32 SAE is
encoded in float32 (a :class:`~gradsae.errors.GradSAEWarning` says so once per pair of
dtypes). Every function here checks its inputs and refuses what it cannot serve with an
:class:`~gradsae.errors.InputError` that names the argument and what is allowed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import GradSAEWarning, InputError
from ..sae import SAE
from .capacity import run_sized
from .contract import Request, Selection, acc_dtype
from .dispatch import choose_backend, choose_optional, get_backend
from .strategy import choose as choose_strategy


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

    @classmethod
    def from_selection(cls, sel: Selection, lead, d_sae: int) -> "Influence":
        """The op's result from a backend's :class:`Selection` with ``grads``, reshaped to the
        caller's leading dimensions ``lead``."""
        shape = (*lead, sel.K)
        idx, acts, grads = sel.indices.reshape(shape), sel.acts.reshape(shape), sel.grads.reshape(shape)
        return cls(idx, acts, grads, acts * grads, d_sae)


# ---------------------------------------------------------------------------------- checks
def as_sae(sae) -> SAE:
    """``sae`` itself when it is a :class:`gradsae.SAE`; a live SAELens / sparsify /
    dictionary_learning SAE wrapped by :meth:`SAE.from_object`; else :class:`InputError`."""
    if isinstance(sae, SAE):
        return sae
    try:
        return SAE.from_object(sae)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message
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


def resolve_k(sae: SAE, k) -> int | None:
    """The slots per row the caller asks for: ``k`` checked against the SAE, or the SAE's own
    ``k`` (topk) / None (threshold: sized to the fullest row) when ``k`` is None."""
    if k is None:
        return sae.k
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an int or None, got {k!r}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if k > sae.d_sae:
        what = "latents kept per row" if sae.activation == "topk" else "a capacity of slots per row"
        raise InputError(
            f"k={k} is more than the SAE's d_sae={sae.d_sae} latents (k is {what}); pass k <= {sae.d_sae}"
            + ("" if sae.activation == "topk" else ", or k=None to size the output to the fullest row")
        )
    return k


_warned_casts: set[tuple[torch.dtype, torch.dtype]] = set()


def _warn_lossy_cast(dtype: torch.dtype, sae: SAE) -> None:
    """One warning per (input dtype, SAE dtype) when encoding in the SAE's dtype loses
    precision or range (float64 inputs to a float32 SAE, float32 to bfloat16, ...)."""
    if dtype == sae.dtype or torch.promote_types(dtype, sae.dtype) == sae.dtype:
        return
    if (dtype, sae.dtype) in _warned_casts:
        return
    _warned_casts.add((dtype, sae.dtype))
    warnings.warn(
        f"inputs are {dtype} but the SAE's weights are {sae.dtype}: gradsae casts the inputs to "
        f"{sae.dtype}, so results have {sae.dtype} precision. Pass {sae.dtype} inputs, or convert "
        f"the SAE with sae.to(dtype={dtype}) (this warning is shown once)",
        GradSAEWarning,
        stacklevel=4,
    )


@dataclass
class Prepared:
    """Checked inputs of one op call: the SAE, the slots asked for (:func:`resolve_k`), the
    caller's leading shape, and ``x`` / ``grad`` flattened to ``[N, d_in]`` and detached."""

    sae: SAE
    k: int | None
    lead: torch.Size
    x: torch.Tensor
    grad: torch.Tensor | None

    def request(self, backend: str, deterministic: bool = False) -> Request:
        return Request(self.x, self.grad, self.sae, self.k, explicit=backend != "auto", deterministic=deterministic)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, values)`` of an input without rows: ``[*lead, K]`` (-1 / 0)."""
        K = self.k if self.k is not None else 0
        idx = torch.full((*self.lead, K), -1, dtype=torch.int64, device=self.sae.device)
        z = torch.zeros((*self.lead, K), dtype=acc_dtype(self.sae.dtype), device=self.sae.device)
        return idx, z


def prepare(x, grad, sae, k, check_finite: bool) -> Prepared:
    """Check the inputs of :func:`influence` (``grad`` None: of :func:`encode_sparse`)."""
    sae = as_sae(sae)
    _check_tensor("x", x, sae)
    if grad is not None:
        _check_tensor("grad", grad, sae)
        if grad.shape != x.shape:
            raise InputError(f"x has shape {tuple(x.shape)} but grad has shape {tuple(grad.shape)}")
        if grad.dtype != x.dtype:
            raise InputError(f"x is {x.dtype} but grad is {grad.dtype}; pass both in one dtype")
    K = resolve_k(sae, k)
    _warn_lossy_cast(x.dtype, sae)
    x2 = x.detach().reshape(-1, sae.d_in)
    g2 = grad.detach().reshape(-1, sae.d_in) if grad is not None else None
    if check_finite and x2.numel():
        if not torch.isfinite(x2).all():
            raise InputError("x contains NaN or infinite values")
        if g2 is not None and not torch.isfinite(g2).all():
            raise InputError("grad contains NaN or infinite values")
    return Prepared(sae, K, x.shape[:-1], x2, g2)


# ------------------------------------------------------------------------------ the op
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
        x: the hook's input (what the SAE encodes), ``[..., d_in]``; cast to the SAE's dtype.
        grad: dY/d(hook output), ``[..., d_in]``, same shape and dtype as ``x``.
        sae: a :class:`gradsae.SAE` (or a live SAELens / sparsify / dictionary_learning SAE).
        k: slots per row, ``1..d_sae``. TopK SAEs: default the SAE's ``k`` (a different value
            overrides how many latents are kept). Threshold SAEs (jumprelu/relu): a capacity;
            a row with more active latents raises :class:`CapacityError`; ``None`` sizes the
            output to the fullest row.
        backend: ``"auto"`` (first capable in priority order) or a name from
            :func:`gradsae.available_backends`.
        check_finite: reject NaN/inf in ``x`` and ``grad`` (one cheap pass over the inputs).
        deterministic: require bitwise reproducible results from the backend.

    Returns:
        :class:`Influence` with ``indices``, ``acts``, ``grads``, ``scores`` of shape
        ``[..., K]``; values in float32 (float64 for a float64 SAE).
    """
    if grad is None:
        raise InputError("grad is required; use SAE.encode_sparse for selection alone")
    p = prepare(x, grad, sae, k, check_finite)
    if p.x.shape[0] == 0:
        idx, z = p.empty()
        return Influence(idx, z, z.clone(), z.clone(), p.sae.d_sae)
    req = p.request(backend, deterministic)
    b = choose_backend(req, backend)
    req = choose_strategy(b, req)
    return Influence.from_selection(run_sized(b.influence, req), p.lead, p.sae.d_sae)


def encode_sparse(x: torch.Tensor, sae, k: int | None = None, backend: str = "auto", *, check_finite: bool = True):
    """Sparse latents ``(indices, values)``, ``[..., K]`` each, -1 / 0 in empty slots.
    ``k`` and ``backend`` as in :func:`influence`."""
    p = prepare(x, None, sae, k, check_finite)
    if p.x.shape[0] == 0:
        return p.empty()
    req = p.request(backend)
    b = choose_backend(req, backend)
    sel = run_sized(b.select, choose_strategy(b, req))
    shape = (*p.lead, sel.K)
    return sel.indices.reshape(shape), sel.acts.reshape(shape)


def check_at(indices: torch.Tensor, acts: torch.Tensor, grad: torch.Tensor, sae: SAE) -> None:
    """Check the inputs of :func:`influence_at`: ``grad`` a tensor for ``sae``, and the three
    of them sharing their leading dimensions."""
    _check_tensor("grad", grad, sae)
    if indices.shape[:-1] != grad.shape[:-1] or acts.shape != indices.shape:
        raise InputError(
            f"indices {tuple(indices.shape)}, acts {tuple(acts.shape)} and grad {tuple(grad.shape)} "
            "must share their leading dimensions"
        )


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
        backend: the backend whose gather-dot runs (a named backend without one runs the
            reference's).
    """
    sae = as_sae(sae)
    check_at(indices, acts, grad, sae)
    K = indices.shape[-1]
    idx2 = indices.reshape(-1, K)
    d2 = grad.detach().reshape(-1, sae.d_in)
    row_scale = None
    if sae.normalize_activations != "none":
        if x is None:
            raise InputError(f"this SAE normalises its input ({sae.normalize_activations}); pass x")
        row_scale = sae.norm_state(x.reshape(-1, sae.d_in)).row_scale
    probe = Request(d2, d2, sae, K, explicit=backend != "auto")
    b = choose_optional(probe, "gather_dot", backend, strict=False) or get_backend("reference")
    g = b.gather_dot(sae.W_dec, idx2, d2, row_scale, sae.col_scale()).reshape(indices.shape)
    a = acts.to(g.dtype) * (indices >= 0)
    return Influence(indices, a, g, a * g, sae.d_sae)


def decode_sparse(sae, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor | None = None,
                  backend: str = "auto", *, strict: bool = True) -> torch.Tensor:
    """Reconstruction from sparse latents (``indices`` -1 = empty), no dense latents
    (:meth:`gradsae.SAE.decode_sparse`).

    Runs on the first backend that serves these tensors and has a sparse decode kernel
    (embedding-bag style), else in PyTorch (:meth:`gradsae.SAE.linear_decode_sparse`).
    ``backend`` names one; one without a sparse decode raises :class:`BackendError`, or, with
    ``strict=False``, decodes in PyTorch (what a spliced model does with its backend).
    ``x``: the input the latents came from, for SAEs with input normalisation.
    """
    sae = as_sae(sae)
    vals = values.to(sae.dtype) * (indices >= 0)
    b = None
    if indices.numel():
        probe = Request(vals.new_empty(0, sae.d_in), None, sae, indices.shape[-1], explicit=backend != "auto")
        b = choose_optional(probe, "decode_sparse", backend, strict=strict)
    x_hat = b.decode_sparse(sae, indices, vals) if b is not None else sae.linear_decode_sparse(indices, vals) + sae.b_dec
    return sae.norm_state(x).apply(x_hat)
