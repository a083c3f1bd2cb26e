"""Backend dispatch: one contract, several implementations, chosen per call.

A backend is an object with

    name: str
    def unsupported(self, req: Request) -> str | None     # why it cannot serve, or None
    def select(self, req: Request) -> (indices, acts)      # active set, [N, K] each
    def influence(self, req: Request) -> (indices, acts, grads)

``req`` is a :class:`Request`: 2-D inputs already checked, cast and on the SAE's device. The
priority list is walked in order; the first backend whose ``unsupported`` returns None serves.
An explicit ``backend=`` that cannot serve raises :class:`BackendError` with its reason, and
``auto`` that finds nobody raises with every backend's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BackendError


@dataclass
class Request:
    """A checked, flattened call of the influence op.

    x: ``[N, d_in]`` raw hook input (normalisation and b_dec are the backend's job, through
       ``sae.preprocess``); grad: ``[N, d_in]`` dY/d(hook output) or None for selection only.
    k: the number of slots ``K``: the SAE's k for topk, the capacity for threshold SAEs, or
       None for "exactly as many as the fullest row needs" (threshold SAEs only).
    explicit: the caller named this backend (backends that are slow but correct, such as the
       Triton interpreter, only serve explicit requests).
    deterministic: results must not depend on scheduling (bitwise reproducible).
    """

    x: torch.Tensor
    grad: torch.Tensor | None
    sae: object
    k: int | None
    explicit: bool = False
    deterministic: bool = False

    @property
    def n(self) -> int:
        return self.x.shape[0]


_REGISTRY: dict[str, object] = {}
_PRIORITY: list[str] = []


def register_backend(backend, priority: int | None = None) -> None:
    """Add ``backend`` to the dispatch list (at position ``priority``, default: before
    ``reference``, which stays last as the fallback that serves everything)."""
    name = backend.name
    _REGISTRY[name] = backend
    if name in _PRIORITY:
        _PRIORITY.remove(name)
    if priority is None:
        priority = _PRIORITY.index("reference") if "reference" in _PRIORITY else len(_PRIORITY)
    _PRIORITY.insert(priority, name)


def available_backends() -> list[str]:
    """Names of registered backends, in priority order."""
    _ensure_loaded()
    return list(_PRIORITY)


def get_backend(name: str):
    _ensure_loaded()
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; registered: {', '.join(_PRIORITY)}")
    return _REGISTRY[name]


def choose_backend(req: Request, backend: str = "auto"):
    """The backend that serves ``req``: the named one, or the first in priority order."""
    _ensure_loaded()
    if backend != "auto":
        b = get_backend(backend)
        req.explicit = True
        why = b.unsupported(req)
        if why is not None:
            raise BackendError(f"backend {backend!r} cannot serve this input: {why}")
        return b
    reasons = []
    for name in _PRIORITY:
        b = _REGISTRY[name]
        why = b.unsupported(req)
        if why is None:
            return b
        reasons.append(f"  {name}: {why}")
    raise BackendError("no backend can serve this input:\n" + "\n".join(reasons))


def choose_backend_with(req: Request, method: str, backend: str = "auto"):
    """The backend that serves ``req`` and implements the optional ``method``, or None when
    only backends without it could serve (the caller then runs the reference code). A named
    backend that cannot serve, or lacks ``method``, raises :class:`BackendError`."""
    _ensure_loaded()
    if backend != "auto":
        b = choose_backend(req, backend)
        if not hasattr(b, method):
            raise BackendError(f"backend {backend!r} has no {method}")
        return b
    for name in _PRIORITY:
        b = _REGISTRY[name]
        if hasattr(b, method) and b.unsupported(req) is None:
            return b
    return None


def explain(req: Request) -> dict[str, str | None]:
    """For each registered backend, why it cannot serve ``req`` (None = it can)."""
    _ensure_loaded()
    return {name: _REGISTRY[name].unsupported(req) for name in _PRIORITY}


_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import reference  # noqa: F401  (registers itself)

    # Optional accelerated backends register themselves when their modules import.
    for mod in ("triton_backend", "cuda_backend"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # module not written/installed: nothing to register
            if e.name and not e.name.startswith(__name__):
                raise


# Optional backend methods (used when present, reference implementation otherwise):
#   gather_dot(W_dec, idx, D, row_scale, col_scale) -> grads [N, K]      (influence_at)
#   decode_sparse(sae, idx, acts) -> x_hat (before de-normalisation)      (splice forward)
#   accumulate(req, stats, mask) -> None  (fused influence + LatentStats update)
#   describe() -> dict                     (gradsae info: versions, compiled archs, ...)
