"""Which encode strategy a backend runs: ``fused`` or ``chunked``, chosen by measurement.

A backend that offers several strategies (:class:`~gradsae.op.contract.Strategies`: the
``triton`` and ``cuda`` backends) gets one chosen per call by :func:`choose`:

1. ``GRADSAE_STRATEGY=fused|chunked`` forces it wherever the backend offers it (``auto`` or
   unset: measure). A backend that cannot run the forced strategy for an input runs its
   default, with a one-time :class:`~gradsae.errors.GradSAEWarning`.
2. Otherwise, for a request large enough that the choice matters (``N x d_sae`` of at least
   :data:`MEASURE_MIN` pre-activations) on a device that can be timed (CUDA), the decision
   cached for its **bucket** is used: the backend, the device (name and compute capability),
   the dtype, topk or threshold, ``k``, ``d_in`` and ``d_sae`` exactly, and ``N`` rounded up
   to a power of two. A bucket without a decision is measured once, on the request itself:
   every offered strategy runs its selection once to warm up (compilation, autotuning) and
   :data:`REPS` times under CUDA events; the fastest median wins and is written to the cache.
3. Else (small requests, CPU tensors, the Triton interpreter) the backend's default.

The cache is one JSON file, ``$XDG_CACHE_HOME/gradsae/strategy.json`` (default
``~/.cache/gradsae/strategy.json``; ``GRADSAE_STRATEGY_CACHE`` names another file), like
Triton's autotune cache: written atomically (a
temporary file renamed into place, merged with what other processes wrote meanwhile); a
decision made with other versions of gradsae, torch or Triton is measured again; a file that
cannot be read as a cache is ignored with a warning and rewritten at the next measurement.
``gradsae info`` shows the override, the file and its decisions (:func:`report`).

Strategies compute the same selection; they may round differently (a ``chunked`` chunk is
written in the inputs' precision before the bias is added in fp32), within the op's
low-precision tolerance, so a machine's results follow its cached decision.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import GradSAEWarning, InputError
from ..fsutil import atomic_write_text
from ..version import __version__
from .capacity import first_slots
from .contract import STRATEGIES, Backend, Request

ENV = "GRADSAE_STRATEGY"
CACHE_ENV = "GRADSAE_STRATEGY_CACHE"
FORMAT = 1
# Requests with fewer pre-activations (N x d_sae) run the backend's default: they take
# microseconds either way and their timings are mostly launch noise.
MEASURE_MIN = 1 << 24
# Timed runs per strategy after one warm-up run; the median counts.
REPS = 5

Timer = Callable[[Callable[[], object], Request], "float | None"]
"""``timer(run, req)``: seconds one ``run()`` of ``req.strategy`` takes, or None where this
request cannot be timed (then nothing is measured or cached)."""

_lock = threading.Lock()
_memo: dict[str, dict] = {}  # cache path -> its decisions, read once per process
_warned: set[str] = set()


# ------------------------------------------------------------------------------ settings
def override() -> str | None:
    """The strategy ``GRADSAE_STRATEGY`` forces, or None (unset, empty or ``auto``)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in STRATEGIES:
        raise InputError(f"{ENV}={v!r} is not a strategy; expected {', '.join(STRATEGIES)} or auto")
    return v


def cache_path() -> Path:
    """``GRADSAE_STRATEGY_CACHE`` if set, else ``$XDG_CACHE_HOME/gradsae/strategy.json``,
    ``~/.cache/gradsae/strategy.json`` by default."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return Path(own).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradsae" / "strategy.json"


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    try:
        from importlib.metadata import version

        triton = version("triton")
    except Exception:  # noqa: BLE001 - not installed, or broken metadata: no Triton
        triton = None
    return (("gradsae", __version__), ("torch", torch.__version__.split("+")[0]), ("triton", triton))


def versions() -> dict[str, str | None]:
    """The software a decision was measured with; another version measures again."""
    return dict(_versions())


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, GradSAEWarning, stacklevel=4)


# ------------------------------------------------------------------------------ buckets
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def device_name(device: torch.device) -> str:
    """The device part of a bucket: the GPU's name and compute capability, or the device type."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return device.type


def bucket(backend: str, req: Request, k: int, device: str | None = None) -> str:
    """The cache key of ``req`` on ``backend`` with ``k`` slots (``device``: its name, by
    default :func:`device_name` of the request's device)."""
    sae = req.sae
    family = "topk" if sae.activation == "topk" else "threshold"
    dtype = str(sae.dtype).removeprefix("torch.")
    dev = device if device is not None else device_name(req.x.device)
    return (f"{backend}/{dev}/{dtype}/{family}/k{_pow2(k)}/d_in{sae.d_in}/d_sae{sae.d_sae}"
            f"/n{_pow2(req.x.shape[0])}")


# ------------------------------------------------------------------------------ the cache
def _read(path: Path) -> tuple[dict, str | None]:
    """(decisions, why the file was not usable); a missing file is an empty cache."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}, None
    except OSError as e:
        return {}, f"it cannot be read ({e.strerror or e})"
    try:
        doc = json.loads(text)
    except ValueError as e:
        return {}, f"it is not JSON ({e})"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("decisions"), dict):
        return {}, f"it is not a gradsae strategy cache of format {FORMAT}"
    return {k: v for k, v in doc["decisions"].items() if isinstance(v, dict)}, None


def _load(path: Path) -> dict:
    key = str(path)
    if key not in _memo:
        decisions, why = _read(path)
        if why is not None:
            _warn_once(f"corrupt:{key}",
                       f"ignoring the strategy cache {path}: {why}; it is rewritten at the next measurement")
        _memo[key] = decisions
    return _memo[key]


def _store(path: Path, key: str, entry: dict) -> None:
    """Add one decision to the file (merged with what is there now) and to the memo."""
    with _lock:
        decisions = _load(path)
        decisions[key] = entry
        on_disk, why = _read(path)
        merged = {**(on_disk if why is None else {}), **decisions}
        text = json.dumps({"format": FORMAT, "decisions": merged}, indent=1, sort_keys=True) + "\n"
        try:
            atomic_write_text(path, text)
        except OSError as e:
            _warn_once(f"write:{path}", f"cannot write the strategy cache {path} ({e.strerror or e}); "
                                        "decisions are kept for this process only")
        decisions.update(merged)


def forget() -> None:
    """Drop the decisions read into this process (the file stays); the next call reads it again."""
    with _lock:
        _memo.clear()
        _warned.clear()


def cached(key: str, path: Path | None = None) -> str | None:
    """The strategy decided for bucket ``key`` with these software versions, or None."""
    entry = _load(path or cache_path()).get(key)
    if not entry or entry.get("versions") != versions() or entry.get("strategy") not in STRATEGIES:
        return None
    return entry["strategy"]


# ------------------------------------------------------------------------------ timing
def cuda_timer(run: Callable[[], object], req: Request) -> float | None:
    """Median seconds of :data:`REPS` runs after one warm-up, timed with CUDA events on the
    current stream; None off CUDA or while a CUDA graph is being captured."""
    dev = req.x.device
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    with torch.cuda.device(dev):
        run()  # compiles and autotunes
        torch.cuda.synchronize(dev)
        times = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(backend: Backend, req: Request, offered: tuple[str, ...], timer: Timer) -> dict | None:
    """Time every strategy in ``offered`` on ``req`` (sized); None if ``timer`` cannot.
    Returns ``{"strategy": fastest, "seconds": {name: s}, "errors": {name: why}}``; a
    strategy that raises is left out (and said once); all of them failing re-raises."""
    seconds, errors, first_error = {}, {}, None
    for s in offered:
        sreq = replace(req, strategy=s)
        try:
            t = timer(lambda: backend.select(sreq), sreq)
        except Exception as e:  # noqa: BLE001 - a strategy that cannot run here loses
            first_error = first_error or e
            errors[s] = f"{type(e).__name__}: {e}".splitlines()[0]
            continue
        if t is None:
            return None
        seconds[s] = float(t)
    if not seconds:
        raise first_error
    for s, why in errors.items():
        _warn_once(f"failed:{backend.name}:{s}:{why}",
                   f"the {s} strategy of backend {backend.name!r} failed while being timed ({why}); "
                   "the other one is used")
    best = min(seconds, key=lambda s: (seconds[s], offered.index(s)))
    return {"strategy": best, "seconds": seconds, "errors": errors}


# ------------------------------------------------------------------------------ the choice
def choose(backend: Backend, req: Request, *, timer: Timer | None = None, path: Path | None = None) -> Request:
    """``req`` with the strategy ``backend`` runs for it (see the module docstring). Backends
    without :class:`~gradsae.op.contract.Strategies`, and requests that name one, pass as
    they are (a named strategy must be offered)."""
    offer = getattr(backend, "strategies", None)
    if offer is None:
        return req
    offered = tuple(offer(req))
    if not offered:
        return req
    if req.strategy is not None:
        if req.strategy not in offered:
            raise InputError(f"backend {backend.name!r} cannot run the {req.strategy!r} strategy for this input; "
                             f"it offers {', '.join(offered)}")
        return req
    forced = override()
    if forced is not None:
        if forced in offered:
            return replace(req, strategy=forced)
        _warn_once(f"forced:{backend.name}:{forced}",
                   f"{ENV}={forced} but backend {backend.name!r} cannot run it for this input; "
                   f"it runs {offered[0]}")
        return replace(req, strategy=offered[0])
    if len(offered) == 1 or req.x.shape[0] * req.sae.d_sae < MEASURE_MIN:
        return replace(req, strategy=offered[0])
    timer = timer or cuda_timer
    sized = replace(req, k=first_slots(req))
    key = bucket(backend.name, sized, sized.k)
    path = path or cache_path()
    hit = cached(key, path)
    if hit in offered:
        return replace(req, strategy=hit)
    result = measure(backend, sized, offered, timer)
    if result is None:
        return replace(req, strategy=offered[0])
    _store(path, key, {**result, "versions": versions()})
    return replace(req, strategy=result["strategy"])


def report() -> dict:
    """For ``gradsae info``: the override, the cache file, and the decisions in it."""
    path = cache_path()
    decisions, why = _read(path)
    try:
        forced = override()
    except InputError as e:
        forced = f"invalid ({e})"
    now = versions()
    return {
        "override": forced,
        "cache": str(path),
        "cache_problem": why,
        "decisions": {k: {"strategy": v.get("strategy"), "seconds": v.get("seconds"),
                          "current": v.get("versions") == now}
                      for k, v in sorted(decisions.items())},
    }
