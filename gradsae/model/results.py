"""Per-prompt GradSAE results: a score per latent and the paper's Top-K / Bottom-K selection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass
class PromptScores:
    """Scores of one prompt.

    ``scores`` ``[d_sae]``: the reduced influence per latent (the paper's
    ``mean over positions of relu(act * grad)`` by default; 0 for latents never active).
    ``active`` ``[d_sae]`` bool: latents active at some real position. ``active_last``: the
    latents active at the last position (sorted), whose count sizes fractional K.
    ``last_acts`` / ``mean_acts`` ``[d_sae]``: activation at the last position and mean
    activation over positions (the activation baseline). ``objective``: Y of this prompt.

    ``method``: how the scores were made (``"grad"``, the first-order score; ``"igN"``,
    integrated gradients with N steps; ``"exact"``, zero-ablation; ``"grad-baseline"``, against a
    counterfactual prompt; see :mod:`gradsae.model.methods`). ``error``: the SAE error term's
    score reduced as the latents' (error mode), else None. ``evaluated`` ``[d_sae]`` bool: the
    latents whose score was computed (``exact`` only; None: every latent), which are the
    candidates of :meth:`top`.
    """

    scores: torch.Tensor
    active: torch.Tensor
    active_last: torch.Tensor
    last_acts: torch.Tensor
    mean_acts: torch.Tensor
    objective: float
    error: float | None = None
    method: str = "grad"
    evaluated: torch.Tensor | None = None

    @property
    def d_sae(self) -> int:
        return self.scores.shape[-1]

    def resolve_k(self, K) -> int:
        """``K`` as a count: an int as is; a float in (0, 1] as that fraction of the latents
        active at the last position, rounded down (the paper's 50% is ``n // 2``)."""
        if isinstance(K, bool):
            raise InputError(f"K must be an int or a fraction, got {K!r}")
        if isinstance(K, int):
            if K < 0:
                raise InputError(f"K must be >= 0, got {K}")
            return K
        if isinstance(K, float):
            if not (0.0 < K <= 1.0):
                raise InputError(f"a fractional K must be in (0, 1], got {K}")
            return math.floor(K * self.active_last.numel() + 1e-9)
        raise InputError(f"K must be an int or a fraction, got {K!r}")

    def _pick(self, cand: torch.Tensor, descending: bool, K, strict: bool, what: str) -> torch.Tensor:
        n = self.resolve_k(K)
        if n > cand.numel():
            if strict:
                raise InputError(
                    f"K={n} is larger than the {cand.numel()} {what}; pass a smaller K "
                    "(or strict=False to get all of them)"
                )
            n = cand.numel()
        vals = self.scores[cand]
        # stable: ties keep ascending latent order
        order = torch.sort(vals, descending=descending, stable=True).indices
        return cand[order[:n]]

    def top(self, K, strict: bool = True) -> torch.Tensor:
        """The ``K`` latents with the highest scores among those active in the prompt (among
        those :attr:`evaluated`, where set)."""
        if self.evaluated is not None:
            cand = torch.nonzero(self.evaluated).flatten()
            return self._pick(cand, True, K, strict, "latents evaluated")
        cand = torch.nonzero(self.active).flatten()
        return self._pick(cand, True, K, strict, "latents active in this prompt")

    def bottom(self, K, strict: bool = True) -> torch.Tensor:
        """The ``K`` latents with the lowest non-zero scores (the paper's Bottom-K)."""
        cand = torch.nonzero(self.scores != 0).flatten()
        return self._pick(cand, False, K, strict, "latents with a non-zero score")

    def activation_baseline(self) -> PromptScores:
        """The same prompt ranked by mean activation over positions instead of influence."""
        return PromptScores(self.mean_acts, self.active, self.active_last, self.last_acts,
                            self.mean_acts, self.objective)


class ScoreResult(list):
    """A list of :class:`PromptScores`, one per prompt, with batch-wide shortcuts."""

    @property
    def scores(self) -> torch.Tensor:
        """``[B, d_sae]``."""
        return torch.stack([p.scores for p in self])

    def top(self, K, strict: bool = True) -> list[torch.Tensor]:
        return [p.top(K, strict) for p in self]

    def bottom(self, K, strict: bool = True) -> list[torch.Tensor]:
        return [p.bottom(K, strict) for p in self]
