"""Checks a corpus run makes before its first batch, so that a bad setting fails in seconds
with a message instead of after (or in the middle of) the work.

- :func:`check_device`: the device exists on this machine (``cuda`` on a CPU build of torch,
  ``cuda:7`` on a one-GPU machine, ``tpu`` are refused);
- :func:`position_limit` / :func:`resolve_max_length`: the sequence length fits the model's
  positions;
- :func:`check_hook`: the hook, against the one the SAE's metadata names;
- :func:`check_objective_tokens`: token ids an objective names are in the vocabulary.
"""

from __future__ import annotations

import re
import warnings

import torch

from ..errors import InputError

# config attributes that state a model's positions, in the order they are trusted
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "seq_length")
# modules holding a learned position table (an index past its size fails)
_LEARNED_TABLE = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings|pos_embed)$")
_SCALED_ROPE = ("linear", "dynamic", "yarn", "longrope")
DEFAULT_MAX_LENGTH = 1024


def check_device(device) -> torch.device | None:
    """``device`` as a :class:`torch.device` if it exists here (None stays None); raises
    :class:`InputError` saying why not."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}; expected cpu, cuda, cuda:N, mps or another "
                         "device type this torch knows") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible to it")
            raise InputError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); "
                             "use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {str(device)!r} does not exist: this machine has {n} CUDA device(s), "
                             f"cuda:0..cuda:{n - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise InputError(f"device {str(device)!r} is not available in this torch ({torch.__version__})")
    return dev


def _config(model):
    return getattr(model, "config", None) or getattr(model, "cfg", None)


def position_limit(model) -> tuple[int, bool, str] | None:
    """``(positions, hard, source)`` the model declares, or None if it states no limit.
    ``hard``: a learned position table of that size (longer inputs cannot run); else the
    length it was trained on (rotary and other relative schemes run past it, unreliably).
    A rotary scaling factor in the config extends the trained length."""
    cfg = _config(model)
    if cfg is None:
        return None
    for key in _POSITION_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            limit = v
            break
    else:
        return None
    hard = getattr(cfg, "positional_embedding_type", None) == "standard" or any(
        isinstance(m, torch.nn.Embedding) and _LEARNED_TABLE.search(name) for name, m in model.named_modules())
    if not hard:
        for attr in ("rope_parameters", "rope_scaling"):  # transformers 5, 4.x
            rs = getattr(cfg, attr, None)
            if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) in _SCALED_ROPE \
                    and "original_max_position_embeddings" not in rs and isinstance(rs.get("factor"), (int, float)):
                limit = int(limit * rs["factor"])
                break
    return limit, hard, f"config.{key}"


def resolve_max_length(model, max_length: int | None) -> int:
    """The sequence length to use: ``max_length`` if the model's positions hold it (else an
    :class:`InputError`), or by default the model's positions, at most 1024."""
    lim = position_limit(model)
    if max_length is None:
        return min(lim[0], DEFAULT_MAX_LENGTH) if lim is not None else DEFAULT_MAX_LENGTH
    if lim is not None and max_length > lim[0]:
        n, hard, src = lim
        kind = getattr(_config(model), "model_type", None) or type(model).__name__
        why = (f"it has a learned table of {n} positions ({src}): longer sequences cannot run" if hard else
               f"it was trained on {n} positions ({src}): past them its predictions are unreliable")
        raise InputError(f"max_length={max_length} does not fit this {kind} model: {why}; use max_length={n} "
                         "or less (longer documents are cut into windows)")
    return max_length


def sae_hook(sae, hook: str | None) -> str:
    """The hook to score at: ``hook``, or the one the SAE's metadata names."""
    if hook is not None:
        return hook
    name = getattr(sae, "hook_name", None)
    if not name:
        raise InputError("the SAE names no hook in its metadata; pass hook=... (CLI: --hook), the hook "
                         "name or module path where the SAE was trained")
    return name


def check_hook(scorer, sae) -> None:
    """Warn when the scorer's hook is not where the SAE's metadata says it was trained."""
    from ..model.hooks import resolve_hook

    meta = getattr(sae, "hook_name", None)
    point = scorer.point
    if not meta or meta == point.name:
        return
    try:
        other = resolve_hook(scorer.model, meta)
    except InputError:
        other = None
    if other is not None and other.module is point.module and other.kind == point.kind:
        return  # another spelling of the same place
    where = "" if other is not None else ", which this model does not have"
    warnings.warn(f"scoring at hook {point.name!r}, but the SAE's metadata says it was trained at {meta!r}{where}",
                  UserWarning, stacklevel=3)


def vocab_size(model) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, torch.nn.Linear):
        return emb.out_features
    v = getattr(_config(model), "vocab_size", None) or getattr(_config(model), "d_vocab", None)
    return int(v) if isinstance(v, int) else None


def check_objective_tokens(model, objective_kwargs: dict) -> None:
    """Token ids an objective names (``target``, ``a``, ``b``) are in the model's vocabulary."""
    n = vocab_size(model)
    for k in ("target", "a", "b"):
        v = objective_kwargs.get(k)
        if v is None:
            continue
        ids = torch.as_tensor(v).flatten().tolist()
        bad = [i for i in ids if not isinstance(i, int) or i < 0 or (n is not None and i >= n)]
        if bad:
            raise InputError(f"{k}={bad[0]!r} is not a token id of this model"
                             + (f" (0..{n - 1})" if n is not None else ""))


__all__ = ["check_device", "position_limit", "resolve_max_length", "sae_hook", "check_hook",
           "check_objective_tokens", "vocab_size", "DEFAULT_MAX_LENGTH"]
