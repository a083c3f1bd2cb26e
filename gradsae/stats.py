"""Per-latent statistics accumulated from :class:`gradsae.Influence` results.

For every latent j, over all token rows seen while j was active:

    count[j]      number of (token) occurrences where j was active
    act_sum[j]    sum of activations z
    score_sum[j]  sum of influence scores (z * dY/dz)
    relu_sum[j]   sum of relu(score)            (the paper's positive influence)
    abs_sum[j]    sum of |score|
    score_max[j]  largest score (-inf where never active)

plus ``tokens``, the number of rows seen (active or not). Sums are kept in float64 so that
very long corpora do not lose precision; ``merge`` combines results of several shards or ranks
and is exact for counts and max, and associative up to float64 rounding for sums.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InputError
from .fsutil import atomic_write, save_safetensors

# The per-latent tables, in the one order every kernel takes them (the Triton kernels, and
# csrc/stats_fields.h, which the compiled module exports as ``_C.STATS_FIELDS``).
FIELDS = ("count", "act_sum", "score_sum", "relu_sum", "abs_sum", "score_max")
SUM_FIELDS = FIELDS[1:5]  # the float64 sums (``count`` is int64, ``score_max`` a running max)
FORMAT = "gradsae.LatentStats"
VERSION = 1


@contextmanager
def _deterministic(on: bool):
    if not on:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


class LatentStats:
    """Running per-latent statistics of influence scores (see module docstring)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        if d_sae < 1:
            raise InputError(f"d_sae must be >= 1, got {d_sae}")
        self.d_sae = int(d_sae)
        self.tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        for f in SUM_FIELDS:
            setattr(self, f, torch.zeros(d_sae, dtype=dtype, device=device))
        self.score_max = torch.full((d_sae,), float("-inf"), dtype=dtype, device=device)

    # ------------------------------------------------------------------ accumulation
    def update(self, inf, mask: torch.Tensor | None = None, *, deterministic: bool = False) -> "LatentStats":
        """Add an :class:`Influence` (any leading shape). ``mask`` (boolean, the leading shape)
        selects the rows that count, e.g. non-padding tokens."""
        if inf.d_sae != self.d_sae:
            raise InputError(f"Influence has d_sae={inf.d_sae} but these stats have d_sae={self.d_sae}")
        idx, acts, scores = inf.indices, inf.acts, inf.scores
        if mask is not None:
            if mask.shape != idx.shape[:-1]:
                raise InputError(f"mask has shape {tuple(mask.shape)}, expected {tuple(idx.shape[:-1])}")
            mask = mask.to(device=idx.device, dtype=torch.bool)
            idx, acts, scores = idx[mask], acts[mask], scores[mask]
            self.tokens += int(mask.sum())
        else:
            self.tokens += idx.shape[:-1].numel()
        valid = idx >= 0
        j = idx[valid].to(self.count.device)
        dt = self.act_sum.dtype
        a = acts[valid].to(self.count.device, dt)
        s = scores[valid].to(self.count.device, dt)
        with _deterministic(deterministic):
            self.count.index_add_(0, j, torch.ones_like(j))
            self.act_sum.index_add_(0, j, a)
            self.score_sum.index_add_(0, j, s)
            self.relu_sum.index_add_(0, j, s.relu())
            self.abs_sum.index_add_(0, j, s.abs())
            self.score_max.scatter_reduce_(0, j, s, reduce="amax", include_self=True)
        return self

    def merge(self, other: "LatentStats") -> "LatentStats":
        """Add ``other``'s statistics into these (in place); returns self."""
        if other.d_sae != self.d_sae:
            raise InputError(f"cannot merge stats with d_sae={other.d_sae} into d_sae={self.d_sae}")
        self.tokens += other.tokens
        self.count += other.count.to(self.count.device)
        for f in SUM_FIELDS:
            getattr(self, f).add_(getattr(other, f).to(getattr(self, f)))
        torch.maximum(self.score_max, other.score_max.to(self.score_max), out=self.score_max)
        return self

    # ------------------------------------------------------------------ derived
    def _per_active(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(self.count > 0, t / self.count.clamp(min=1).to(t.dtype), torch.zeros_like(t))

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of token rows where each latent was active."""
        return self.count.to(self.act_sum.dtype) / max(1, self.tokens)

    @property
    def mean_act(self) -> torch.Tensor:
        """Mean activation over the rows where the latent was active (0 if never)."""
        return self._per_active(self.act_sum)

    @property
    def mean_score(self) -> torch.Tensor:
        """Mean influence score over the rows where the latent was active (0 if never)."""
        return self._per_active(self.score_sum)

    @property
    def mean_relu_score(self) -> torch.Tensor:
        """Mean over *all* token rows of relu(score), inactive rows counting 0: the paper's
        per-prompt score, taken over the whole corpus."""
        return self.relu_sum / max(1, self.tokens)

    def top(self, n: int = 10, by: str = "relu_sum") -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` latents with the largest ``by`` (any field or derived property)."""
        vals = getattr(self, by)
        n = min(n, self.d_sae)
        v, i = vals.to(torch.float64).topk(n)
        return i, v

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The tables by name, in :data:`FIELDS` order (the tensors themselves, not copies)."""
        return {f: getattr(self, f) for f in FIELDS}

    def __eq__(self, other) -> bool:  # exact equality, for tests and resume checks
        if not isinstance(other, LatentStats) or other.d_sae != self.d_sae or other.tokens != self.tokens:
            return False
        a, b = self.to_dict(), other.to_dict()
        return all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)

    def __repr__(self) -> str:
        return f"LatentStats(d_sae={self.d_sae}, tokens={self.tokens}, active_latents={int((self.count > 0).sum())})"

    # ------------------------------------------------------------------ I/O
    def save(self, path) -> None:
        """Write to a safetensors file atomically (a temporary file renamed into place)."""
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.to_dict().items()}
        meta = {"format": FORMAT, "version": str(VERSION), "tokens": str(self.tokens), "d_sae": str(self.d_sae)}
        atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> "LatentStats":
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from e
        if meta.get("format") != FORMAT:
            raise InputError(f"{path}: not a gradsae LatentStats file (metadata {json.dumps(meta)})")
        d_sae = int(meta["d_sae"])
        out = cls(d_sae, device=device, dtype=tensors["act_sum"].dtype)
        out.tokens = int(meta["tokens"])
        for k, v in tensors.items():
            if tuple(v.shape) != (d_sae,):
                raise InputError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected [{d_sae}]")
            setattr(out, k, v.to(device))
        return out
