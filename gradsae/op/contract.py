"""The contract between the influence op and its backends: what a backend is asked
(:class:`Request`), what it answers (:class:`Selection`), and the methods it has
(:class:`Backend`, and the optional :class:`GatherDot`, :class:`SparseDecode`,
:class:`Accumulate`, :class:`Describe`, :class:`Strategies`).

The op (:mod:`gradsae.op.api`) checks and flattens the user's inputs, picks a backend
(:mod:`gradsae.op.dispatch`), sizes the output of threshold SAEs
(:mod:`gradsae.op.capacity`) and shapes the result. A backend computes, for a checked
``[N, d_in]`` request, the active set of every row in ``K`` slots, and what the op asks of it
beyond that: dY/dz of those slots, a sparse decode, a fused statistics update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# The widest top-k the accelerated backends keep per row (registers and shared memory per
# row are sized for it). The Triton kernels import it; csrc/select.cuh's kMaxK must equal it
# (the cuda backend refuses a module built with another, and a test compares the sources).
MAX_K = 256

# The encode strategies a GPU backend may offer (:class:`Strategies`): ``fused``, the encode
# GEMM with the selection in its epilogue; ``chunked``, the vendor GEMM per chunk of latents
# and a streaming selection pass per chunk. The op picks one per call
# (:mod:`gradsae.op.strategy`).
STRATEGIES = ("fused", "chunked")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype results are reported (and sums accumulated) in: float32, float64 for a
    float64 SAE."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Request:
    """A checked, flattened call of the influence op.

    x: ``[N, d_in]`` raw hook input on the SAE's device (normalisation and ``b_dec`` are the
       backend's job, through ``sae.preprocess``); grad: ``[N, d_in]`` dY/d(hook output) in
       ``x``'s dtype, or None for selection only.
    sae: the :class:`gradsae.SAE`.
    k: the number of slots ``K`` per row: the top-k of a topk SAE (``1..d_sae``), the capacity
       of a threshold SAE. ``None`` (threshold SAEs only) asks the op for "as many as the
       fullest row needs"; the op turns it into a capacity before a backend computes anything,
       so :meth:`Backend.select` and :meth:`Backend.influence` always see an int.
    explicit: the caller named this backend (backends that are slow but correct, such as the
       Triton interpreter, serve only explicit requests).
    deterministic: results must not depend on scheduling (bitwise reproducible).
    strategy: the encode strategy the op chose for a backend that offers several
       (:class:`Strategies`); None for other backends, and means the backend's default.
    """

    x: torch.Tensor
    grad: torch.Tensor | None
    sae: object
    k: int | None
    explicit: bool = False
    deterministic: bool = False
    strategy: str | None = None

    @property
    def n(self) -> int:
        return self.x.shape[0]


@dataclass
class Selection:
    """A backend's answer: the active latents of every row, in ``K = req.k`` slots.

    indices: ``[N, K]`` int64, latent ids, -1 in empty slots.
    acts: ``[N, K]`` activations z (float32; float64 for a float64 SAE), 0 in empty slots.
    counts: ``[N]`` integer, the number of active latents of each row, for threshold SAEs;
        a row whose count exceeds ``K`` did not fit (its slots hold ``K`` of its latents) and
        the op retries with more slots or raises :class:`~gradsae.errors.CapacityError`.
        None for topk SAEs, which always fit.
    row_scale: ``[N]`` the per-row slope of the decode (input normalisation, from
        ``sae.preprocess``), or None for an SAE without one.
    grads: ``[N, K]`` dY/dz of every slot (from :meth:`Backend.influence`; None from
        :meth:`Backend.select`).
    """

    indices: torch.Tensor
    acts: torch.Tensor
    counts: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    grads: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return self.indices.shape[-1]

    def narrow(self, K: int) -> "Selection":
        """The first ``K`` slots of every row (``K`` at most the current width)."""
        cut = lambda t: None if t is None else t[:, :K].contiguous()  # noqa: E731
        return Selection(cut(self.indices), cut(self.acts), self.counts, self.row_scale, cut(self.grads))


class Backend(Protocol):
    """What every backend of the influence op provides: :attr:`name`, :meth:`unsupported`,
    :meth:`select`, :meth:`influence`.

    A backend may also have any of the optional methods declared by :class:`GatherDot`,
    :class:`SparseDecode`, :class:`Accumulate` and :class:`Describe`, with exactly those
    signatures; the op looks for them by name (:data:`OPTIONAL`) and, where a backend has
    none, runs its own PyTorch form. A backend need not inherit from any of these classes.

    Backends compute; the op decides. In particular the op, not a backend, owns the capacity
    of threshold SAEs: a backend fills at most ``req.k`` slots per row and reports every row's
    count, and the op retries at the exact size or raises (:mod:`gradsae.op.capacity`).
    """

    name: str

    def unsupported(self, req: Request) -> str | None:
        """Why this backend cannot serve ``req`` (device, dtype, shape, not built), in words
        that complete "cannot serve this input: ...", or None when it can."""

    def select(self, req: Request) -> Selection:
        """The active set of every row of ``req.x`` in ``req.k`` slots (``grads`` None).
        TopK: the k largest selection values ``v`` with ``v > 0`` (fewer slots filled where
        fewer are positive). Threshold: every latent with ``v > max(threshold, 0)``, in
        ascending latent order, the first ``req.k`` of them, and ``counts``."""

    def influence(self, req: Request) -> Selection:
        """:meth:`select` and the gradient of every filled slot:
        ``grads = row_scale * col_scale[j] * (W_dec[j] . grad)`` (0 in empty slots)."""


class GatherDot(Protocol):
    """Optional: the gather-dot alone."""

    def gather_dot(self, W_dec: torch.Tensor, idx: torch.Tensor, D: torch.Tensor,
                   row_scale: torch.Tensor | None = None,
                   col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``g[n, s] = row_scale[n] * col_scale[idx[n, s]] * (W_dec[idx[n, s]] . D[n])``,
        0 where ``idx < 0``; ``[N, K]`` in float32 (float64 for float64 weights). Serves
        :func:`gradsae.influence_at` (the backward of a spliced model)."""


class SparseDecode(Protocol):
    """Optional: a sparse-decode kernel."""

    def decode_sparse(self, sae, idx: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """``(acts * col_scale[idx]) @ W_dec[idx] + b_dec`` per row, ``[..., d_in]`` in the
        SAE's dtype, before de-normalisation, differentiable in ``acts`` (its backward is the
        gather-dot). Serves the splice's forward."""


class Accumulate(Protocol):
    """Optional: a fused statistics update."""

    def accumulate(self, req: Request, sel: Selection, tables: dict[str, torch.Tensor],
                   mask: torch.Tensor | None, keep_grads: bool = False) -> torch.Tensor | None:
        """Add the influence of the slots of ``sel`` (its ``indices``, float32 ``acts`` and
        ``row_scale``, e.g. a :meth:`Backend.select` answer for ``req``) to per-latent
        ``tables`` without returning per-token scores: ``tables`` maps every name of
        :data:`gradsae.stats.FIELDS` to a contiguous ``[d_sae]`` tensor on ``req``'s device
        (int64 ``count``, float64 sums and max). ``mask`` ``[N]`` bool selects the rows that
        count (None: all). With ``req.deterministic`` the sums must be bitwise repeatable. The
        op counts tokens. Returns None, or with ``keep_grads`` the ``grads`` ``[N, K]`` of
        every slot (float32, 0 in empty slots) from the same pass (the spliced model's
        backward needs both)."""


class Describe(Protocol):
    """Optional: facts for ``gradsae info``."""

    def describe(self) -> dict:
        """Versions, compiled architectures, limits."""


class Strategies(Protocol):
    """Optional: several ways to compute the same selection (:data:`STRATEGIES`)."""

    def strategies(self, req: Request) -> tuple[str, ...]:
        """The encode strategies that can serve ``req`` (a subset of :data:`STRATEGIES`),
        the backend's default first. :meth:`Backend.select` and :meth:`Backend.influence`
        then run ``req.strategy`` (the default when it is None); the op chooses which
        (:mod:`gradsae.op.strategy`: an override, a measurement cached on disk, else the
        default)."""


REQUIRED = ("name", "unsupported", "select", "influence")
OPTIONAL: dict[str, type] = {
    "gather_dot": GatherDot,
    "decode_sparse": SparseDecode,
    "accumulate": Accumulate,
    "describe": Describe,
    "strategies": Strategies,
}
