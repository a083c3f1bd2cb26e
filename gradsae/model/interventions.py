"""Edits of SAE latents inside a spliced model: zero latents, set them to values, add decoder
directions.

    with scorer.intervene(zero=[12, 40]):                      # the paper's perturbation
        text = scorer.generate(prompt)
    with scorer.intervene(**perturbation(scores, 10)):         # the same, from PromptScores
        ...
    with scorer.intervene(**steering(own, donor, 10)):         # the paper's local steering
        ...

An edit applies to every forward through the hook while the ``with`` block runs, so to every
generation step. ``positions="all"`` edits every token; ``"last"`` only the last token of each
forward (the released code's steering, which re-runs the full prefix at every step; generation
under a ``"last"`` edit does the same instead of using the KV cache).

Because decode is affine in z, every edit is a change ``dz_j`` of a few latents and moves the
hook's output by ``row_scale * dz_j * col_scale_j * W_dec[j]``; ``add`` moves it by
``alpha * W_dec[j]`` directly (steering along the raw decoder direction).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import GradSAEWarning, InputError

POSITIONS = ("all", "last")


def _latents(name: str, v, d_sae: int) -> torch.Tensor:
    t = torch.as_tensor(list(v) if not isinstance(v, torch.Tensor) else v, dtype=torch.long).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_sae):
        raise InputError(f"{name}: latent indices must be in [0, {d_sae}), got {t.tolist()}")
    return t


@dataclass
class Intervention:
    """Latent edits: ``zero`` (latents forced to 0), ``set`` ({latent: value}: forced to that
    activation, active or not; applied after ``zero``, so a latent in both ends at its value),
    ``add`` ({latent: alpha}: ``alpha * W_dec[latent]`` added to the hook's output),
    at ``positions`` ``"all"`` or ``"last"``."""

    zero: list[int] = field(default_factory=list)
    set: dict[int, float] = field(default_factory=dict)
    add: dict[int, float] = field(default_factory=dict)
    positions: str = "all"

    def validate(self, d_sae: int) -> Intervention:
        if self.positions not in POSITIONS:
            raise InputError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        _latents("zero", self.zero, d_sae)
        _latents("set", list(self.set), d_sae)
        _latents("add", list(self.add), d_sae)
        return self

    def apply(self, sae, idx, acts, x, pos):
        """Edit the active set ``(idx, acts)`` ``[B, T, K]`` of input ``x``; ``pos`` is a
        ``[B, T]`` boolean of positions to edit (None = all). Returns the new ``acts`` (zeroed
        slots) and the extra output ``[B, T, d_in]`` for ``set`` and ``add``."""
        from .splice import delta_decode

        dev = idx.device
        where = (lambda m: m) if pos is None else (lambda m: m & pos.unsqueeze(-1))
        if len(self.zero):
            z = torch.as_tensor(list(self.zero), dtype=torch.long, device=dev)
            kill = where(torch.isin(idx, z) & (idx >= 0))
            acts = torch.where(kill, torch.zeros_like(acts), acts)
        extra = torch.zeros(*idx.shape[:-1], sae.d_in, dtype=sae.dtype, device=dev)
        if self.set:
            js = torch.as_tensor([int(j) for j in self.set], dtype=torch.long, device=dev)
            vals = torch.as_tensor([float(v) for v in self.set.values()], dtype=acts.dtype, device=dev)
            # current activation of each set latent at each position (0 when inactive)
            match = (idx.unsqueeze(-1) == js) & (idx >= 0).unsqueeze(-1)  # [B, T, K, m]
            cur = (acts.unsqueeze(-1) * match).sum(-2)  # [B, T, m]
            dv = vals - cur
            if pos is not None:
                dv = dv * pos.unsqueeze(-1)
            jj = js.expand(*idx.shape[:-1], js.numel())
            extra = extra + delta_decode(sae, jj, dv, x)
        if self.add:
            js = torch.as_tensor([int(j) for j in self.add], dtype=torch.long, device=dev)
            al = torch.as_tensor([float(v) for v in self.add.values()], dtype=sae.dtype, device=dev)
            vec = al @ sae.W_dec[js]
            add = vec.expand_as(extra)
            if pos is not None:
                add = add * pos.unsqueeze(-1)
            extra = extra + add
        return acts, extra


DONOR_VALUES = ("last", "mean", "score")


def donor_values(scores, latents, how: str = "last") -> dict[int, float]:
    """``{latent: value}`` to inject a donor's ``latents``, from the donor's
    :class:`~gradsae.model.results.PromptScores`: its activation at the last position
    (``"last"``), its mean activation (``"mean"``), or its GradSAE score (``"score"``: what the
    released code stores and injects).

    With ``"last"``, a latent that is not active at the donor's last position has no value to
    give (setting it would zero it in the edited prompt instead): it is left out, and a
    :class:`~gradsae.errors.GradSAEWarning` names the latents left out."""
    src = {"last": scores.last_acts, "mean": scores.mean_acts, "score": scores.scores}.get(how)
    if src is None:
        raise InputError(f"donor values must be one of {DONOR_VALUES}, got {how!r}")
    out = {int(j): float(src[j]) for j in latents}
    if how == "last":
        inactive = [j for j, v in out.items() if v == 0]
        if inactive:
            warnings.warn(
                f"donor latents {inactive} are not active at the donor's last position (activation 0 there): "
                "left out of the injection rather than set to 0 (values='mean' or 'score' give them a value)",
                GradSAEWarning,
                stacklevel=3,
            )
            out = {j: v for j, v in out.items() if v != 0}
    return out


def perturbation(scores, K, which: str = "top", positions: str = "all", strict: bool = False) -> dict:
    """The paper's perturbation as :meth:`GradSAE.intervene` arguments: zero the prompt's
    Top-K (``which="top"``) or Bottom-K latents of ``scores`` (a ``PromptScores``)."""
    if which not in ("top", "bottom"):
        raise InputError(f"which must be 'top' or 'bottom', got {which!r}")
    lat = scores.top(K, strict) if which == "top" else scores.bottom(K, strict)
    return {"zero": lat.tolist(), "positions": positions}


def steering(own, donor, K, values: str = "last", positions: str = "last", strict: bool = False) -> dict:
    """The paper's local steering as :meth:`GradSAE.intervene` arguments: zero ``own``'s Top-K
    and set ``donor``'s Top-K to the donor's ``values`` (see :func:`donor_values`; with
    ``"last"``, donor latents inactive at the donor's last position are left out with a
    warning), at the ``"last"`` position (the released code) or ``"all"`` positions (the
    paper's text)."""
    give = donor.top(K, strict).tolist()
    return {"zero": own.top(K, strict).tolist(), "set": donor_values(donor, give, values),
            "positions": positions}
