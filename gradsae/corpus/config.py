"""The settings of one corpus run, in one frozen dataclass from the caller to ``meta.json``.

    cfg = RunConfig(hook="blocks.6.hook_resid_post", out="runs/l6", max_length=512)
    res = run_corpus(model, sae, "corpus.jsonl", cfg, tokenizer=tok)

:func:`gradsae.score_corpus` builds a :class:`RunConfig` from its keyword arguments and the
``gradsae score`` command from its options; the runner resolves what depends on the model
(:meth:`RunConfig.resolved`: the hook name, the sequence length, the device) and writes
:meth:`RunConfig.record` into every checkpoint and into ``meta.json``, where a resumed run's
record is compared with the checkpoint's (:func:`gradsae.corpus.resume.config_diff`).
Every value is checked when the object is made, so a bad setting fails before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from ..errors import InputError
from ..model import objectives as _obj
from .batching import LONG_MODES
from .data import ENCODING_ERRORS, FORMATS

AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}
MODES = ("splice", "error")
DEFAULT_OBJECTIVE = "loglik"
METHODS = ("grad", "ig")  # a corpus run's attribution methods (exact ablation is per prompt)


def _positive_int(name: str, v, minimum: int = 1, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {v!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a corpus run computes and where it writes (see
    :func:`gradsae.score_corpus` for the meaning of each field)."""

    # what is computed
    hook: str | None | tuple = None  # a run with several SAEs: one hook (or None) per SAE
    objective: Union[str, Callable] = DEFAULT_OBJECTIVE
    objective_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "splice"
    max_length: int | None = None
    long: str = "window"
    batch_tokens: int = 8192
    top_n: int = 10
    context: int = 8
    autocast: str | None = None
    backend: str = "auto"
    deterministic: bool = False
    method: str = "grad"
    steps: int = 16
    # how the data is read (when it is a path)
    field: str = "text"
    format: str | None = None
    split: str | None = None
    encoding_errors: str = "strict"
    # where and how it runs
    out: Path | None = None
    device: str | None = None
    checkpoint_every: int | None = None
    checkpoint_interval: float | None = 600.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    # Settings a resumed run may change (they do not change the results).
    VOLATILE = ("device", "checkpoint_every", "checkpoint_interval", "deterministic")
    # Settings that steer this session only and are not recorded in meta.json (the data
    # reading options are recorded in the data's own description).
    NOT_RECORDED = ("out", "resume", "overwrite", "progress", "field", "format", "split", "encoding_errors")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen
        set_("objective_kwargs", dict(self.objective_kwargs or {}))
        if isinstance(self.hook, (list, tuple)):
            if not self.hook:
                raise InputError("hook: an empty list of hooks; pass one hook (or None) per SAE")
            bad = [h for h in self.hook if h is not None and (not isinstance(h, str) or not h)]
            if bad:
                raise InputError(f"hook: every hook must be a non-empty string or None, got {bad[0]!r}")
            set_("hook", tuple(self.hook))
        elif self.hook is not None and (not isinstance(self.hook, str) or not self.hook):
            raise InputError(f"hook must be a non-empty string, a list of them (one per SAE) or None, got {self.hook!r}")
        if self.out is not None:
            set_("out", Path(self.out))
        if self.device is not None:
            set_("device", str(self.device))
        if self.long not in LONG_MODES:
            raise InputError(f"long must be one of {LONG_MODES}, got {self.long!r}")
        if self.autocast not in AUTOCAST:
            raise InputError(f"autocast must be one of {sorted(k for k in AUTOCAST if k)} or None, "
                             f"got {self.autocast!r}")
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise InputError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {self.encoding_errors!r}")
        if self.format is not None and self.format not in FORMATS:
            raise InputError(f"unknown data format {self.format!r}; expected one of {FORMATS}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS} for a corpus run, got {self.method!r}"
                             + (" (exact ablation is per prompt: GradSAE.score or gradsae select)"
                                if self.method == "exact" else ""))
        _positive_int("steps", self.steps)
        _positive_int("batch_tokens", self.batch_tokens)
        _positive_int("top_n", self.top_n)
        _positive_int("context", self.context, minimum=0)
        _positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        if self.checkpoint_interval is not None and not (
                isinstance(self.checkpoint_interval, (int, float)) and self.checkpoint_interval > 0):
            raise InputError(f"checkpoint_interval must be a number of seconds > 0, got {self.checkpoint_interval!r}")
        self._check_objective()
        _positive_int("max_length", self.max_length, minimum=self.min_length, allow_none=True)
        if self.resume and self.overwrite:
            raise InputError("resume=True and overwrite=True contradict each other: resume continues the "
                             "unfinished run in the output directory, overwrite discards it; pass one of them")

    def _check_objective(self) -> None:
        obj = self.objective
        if callable(obj):
            return
        if obj not in _obj.NAMES:
            raise InputError(f"unknown objective {obj!r}; expected one of {_obj.NAMES} or a callable")
        unknown = sorted(set(self.objective_kwargs) - {"position", *(a for v in _obj.ARGUMENTS.values() for a in v)})
        if unknown:  # a misspelt setting lands in **objective_kwargs
            raise InputError(f"unexpected setting(s) {', '.join(unknown)}: not a setting of score_corpus nor an "
                             f"argument of an objective")
        takes = set(_obj.ARGUMENTS[obj]) | ({"position"} if obj not in _obj.SEQUENCE_OBJECTIVES else set())
        extra = sorted(set(self.objective_kwargs) - takes)
        if extra:
            raise InputError(f"objective {obj!r} takes no {', '.join(extra)}"
                             + (f" (it takes {', '.join(sorted(takes))})" if takes else ""))
        missing = [k for k in _obj.ARGUMENTS[obj] if self.objective_kwargs.get(k) is None]
        if missing:
            raise InputError(f"objective {obj!r} needs {' and '.join(f'{k}=<token id>' for k in missing)}")

    # ------------------------------------------------------------------ derived
    @property
    def objective_name(self) -> str:
        """The objective's name (a callable: its qualified name)."""
        return _obj.meaning(self.objective)["objective"]

    @property
    def min_length(self) -> int:
        """Tokens a sequence needs: 2 for the next-token objectives, else 1."""
        return 2 if self.objective in _obj.SEQUENCE_OBJECTIVES else 1

    def resolved(self, **changes) -> "RunConfig":
        """A copy with ``changes`` (the runner fills in the hook, max_length and device it uses)."""
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """The settings as JSON values, for checkpoints and ``meta.json`` (``config``)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.NOT_RECORDED:
                continue
            v = getattr(self, f.name)
            if f.name == "objective":
                v = self.objective_name
            elif f.name == "objective_kwargs":
                v = {k: repr(x) for k, x in sorted(v.items())}
            elif f.name == "hook" and isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


__all__ = ["RunConfig", "AUTOCAST", "DEFAULT_OBJECTIVE"]
