"""Which backend serves a call: one explicit priority list, walked in order.

The built-in backends are named in :data:`PRIORITY` with the module that implements each.
The op sits below them: it never imports a backend module by name in its source, it loads
them here, on first use, with :func:`importlib.import_module`, and takes the module's
``BACKEND`` object. A backend whose module fails to import (say, Triton is not installed)
stays in the list with that failure as its reason, so ``auto`` moves on and an explicit
``backend=`` says why.

For every call the list is walked in order and the first backend whose ``unsupported``
returns None serves. An explicit ``backend=`` that cannot serve raises
:class:`~gradsae.errors.BackendError` with its reason; ``auto`` that finds nobody raises with
every backend's reason. :func:`register_backend` adds backends of other packages.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from ..errors import BackendError
from .contract import OPTIONAL, REQUIRED, Backend, Request

# The built-in backends, first choice first, and the modules that implement them. The
# reference serves every input and stays last: it is the fallback.
PRIORITY: tuple[tuple[str, str], ...] = (
    ("triton", "gradsae.backends.triton_backend"),
    ("cuda", "gradsae.backends.cuda_backend"),
    ("reference", "gradsae.backends.reference"),
)

_order: list[str] = []  # names in priority order: PRIORITY, then what register_backend added
_registry: dict[str, Backend] = {}


class _Unloadable:
    """Stands for a built-in backend whose module failed to import; serves nothing."""

    def __init__(self, name: str, why: str):
        self.name = name
        self._why = why

    def unsupported(self, req: Request) -> str:
        return self._why

    def select(self, req: Request):  # pragma: no cover - never chosen
        raise BackendError(f"backend {self.name!r}: {self._why}")

    influence = select


def _load(name: str, module: str) -> Backend:
    try:
        return importlib.import_module(module).BACKEND
    except ImportError as e:
        return _Unloadable(name, f"its module {module} failed to import ({type(e).__name__}: {e})")


def _ensure_loaded() -> None:
    if _registry:
        return
    for name, module in PRIORITY:
        _registry[name] = _load(name, module)
        _order.append(name)


def register_backend(backend: Backend, priority: int | None = None) -> None:
    """Add ``backend`` (any object with the :class:`~gradsae.op.contract.Backend` methods) to
    the dispatch list at position ``priority`` (default: just before ``reference``, which
    stays the last resort). A backend of the same name is replaced."""
    _ensure_loaded()
    missing = [m for m in REQUIRED if not hasattr(backend, m)]
    if missing:
        raise BackendError(f"{type(backend).__name__} is not a backend: it has no {', '.join(missing)}")
    name = backend.name
    if name in _order:
        _order.remove(name)
    if priority is None:
        priority = _order.index("reference") if "reference" in _order else len(_order)
    _registry[name] = backend
    _order.insert(priority, name)


def unregister_backend(name: str) -> None:
    """Remove a backend added by :func:`register_backend` (built-in ones cannot be removed)."""
    if name in dict(PRIORITY):
        raise BackendError(f"{name!r} is a built-in backend and cannot be removed")
    if name in _order:
        _order.remove(name)
    _registry.pop(name, None)


def available_backends() -> list[str]:
    """Names of the registered backends, in priority order (whether or not they can run here;
    ``gradsae info`` says which can)."""
    _ensure_loaded()
    return list(_order)


def get_backend(name: str) -> Backend:
    """The backend called ``name``."""
    _ensure_loaded()
    if name not in _registry:
        raise BackendError(f"unknown backend {name!r}; registered: {', '.join(_order)}")
    return _registry[name]


def choose_backend(req: Request, backend: str = "auto") -> Backend:
    """The backend that serves ``req``: the one named, or the first capable in priority order."""
    _ensure_loaded()
    if backend != "auto":
        b = get_backend(backend)
        why = b.unsupported(req if req.explicit else replace(req, explicit=True))
        if why is not None:
            raise BackendError(f"backend {backend!r} cannot serve this input: {why}")
        return b
    reasons = []
    for name in _order:
        b = _registry[name]
        why = b.unsupported(req)
        if why is None:
            return b
        reasons.append(f"  {name}: {why}")
    raise BackendError("no backend can serve this input:\n" + "\n".join(reasons))


def choose_optional(req: Request, method: str, backend: str = "auto", *, strict: bool = True) -> Backend | None:
    """The backend that serves ``req`` with the optional ``method``, or None: the caller then
    runs the op's own PyTorch form of it.

    ``auto``: the first capable backend in priority order that has ``method`` (None if only
    backends without it can serve). A named backend that cannot serve raises
    :class:`BackendError`; one that lacks ``method`` raises too when ``strict``, else gives
    None (the splice's rule: the backend the user chose runs what it has kernels for)."""
    _ensure_loaded()
    if method not in OPTIONAL:
        raise ValueError(f"{method!r} is not an optional backend method; expected one of {sorted(OPTIONAL)}")
    if backend != "auto":
        b = choose_backend(req, backend)
        if hasattr(b, method):
            return b
        if strict:
            raise BackendError(f"backend {backend!r} has no {method}")
        return None
    for name in _order:
        b = _registry[name]
        if hasattr(b, method) and b.unsupported(req) is None:
            return b
    return None


def explain(req: Request) -> dict[str, str | None]:
    """For each registered backend, why it cannot serve ``req`` (None = it can)."""
    _ensure_loaded()
    return {name: _registry[name].unsupported(req) for name in _order}
