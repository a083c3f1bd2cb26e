"""Recipes of the paper's studies: every knob where gradsae's default and the authors'
released code (public repository Tizzzzy/sae_gradient, ``experiment1/``, ``experiment2/``,
``baseline/``) differ, one frozen dataclass per recipe.

    from gradsae.experiments import run_experiments
    res = run_experiments(scorer, examples, recipe="released")   # CLI: --recipe released

``"default"`` is gradsae's own choice for each knob; ``"released"`` reproduces what the
released code does. The differences, knob by knob:

========================  ===============================  ========================================
knob                      default                          released
========================  ===============================  ========================================
``trigger_at``            ``"first"`` ``[`` step scored    ``"last"``: the code scores at every step
                                                           whose predicted token contains ``[`` and
                                                           overwrites, so the last one is stored
``selection``             ``"active"``: Top-K among the    ``"argsort"``: Top-K is an argsort over
                          latents active in the prompt     all latents, padded with zero-score
                          (fewer when fewer), Bottom-K     latents (inactive ones included) when
                          among the non-zero scores        fewer than K scores are positive;
                                                           Bottom-K the non-zero scores ascending
``keep``                  ``"exact"``: SQuAD exact match   ``"f1"``: F1 >= ``keep_f1`` (0.9)
``answer``                ``"clean"``: special tokens      ``"released"``: special tokens kept
                          dropped, ``[[ .. ]]`` first      (``<eos>`` stays in an answer without
                                                           brackets) but ``<end_of_turn>``; the
                                                           first ``[ .. ]`` on one line
``donor``                 ``"next"`` kept example          ``"same-context"``: another kept question
                                                           on the same paragraph, drawn with
                                                           ``random.Random(donor_seed)`` (42); an
                                                           example without one is not steered
``donor_values``          ``"last"``: activation at the    ``"score"``: the donor's ranking score
                          donor's last position            (its GradSAE score; for the activation
                                                           baseline its mean activation)
``clamp``                 None                             ``(0, 50)``: injected values clamped
``splice_dtype``          ``"model"``: cast back to the    ``"sae"``: the SAE's dtype (a float16
                          hook's dtype                     model and a float32 SAE: the residual
                                                           stream is float32 after the hook)
``prompt_style``          ``"plain"``: the paper's prompt  ``"gemma-released"``: opened with
                                                           ``<start_of_turn>user`` (Gemma-2)
========================  ===============================  ========================================

Both mask at every position and step, steer at the last position, generate greedily for at
most 50 tokens and stop at the end-of-sequence ids (Gemma's ``<end_of_turn>`` included).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from .errors import InputError

TRIGGER_AT = ("first", "last")
SELECTIONS = ("active", "argsort")
KEEPS = ("exact", "f1")
ANSWERS = ("clean", "released")
DONORS = ("next", "same-context")
DONOR_VALUES = ("last", "mean", "score")
SPLICE_DTYPES = ("model", "sae")
PROMPT_STYLES = ("plain", "gemma-released")


@dataclass(frozen=True)
class Recipe:
    """The knobs of the paper's studies (see the module docstring for what each one does)."""

    name: str
    trigger_at: str = "first"
    selection: str = "active"
    keep: str = "exact"
    keep_f1: float = 0.9
    answer: str = "clean"
    donor: str = "next"
    donor_seed: int = 42
    donor_values: str = "last"
    clamp: tuple[float, float] | None = None
    splice_dtype: str = "model"
    prompt_style: str = "plain"

    def __post_init__(self):
        for name, allowed in (("trigger_at", TRIGGER_AT), ("selection", SELECTIONS), ("keep", KEEPS),
                              ("answer", ANSWERS), ("donor", DONORS), ("donor_values", DONOR_VALUES),
                              ("splice_dtype", SPLICE_DTYPES), ("prompt_style", PROMPT_STYLES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"recipe {self.name!r}: {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.clamp is not None and not (len(self.clamp) == 2 and self.clamp[0] <= self.clamp[1]):
            raise InputError(f"recipe {self.name!r}: clamp must be (low, high) with low <= high, "
                             f"got {self.clamp!r}")

    def describe(self) -> dict:
        """The knobs as a plain dict (for result files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT = Recipe("default")
RELEASED = Recipe("released", trigger_at="last", selection="argsort", keep="f1", keep_f1=0.9,
                  answer="released", donor="same-context", donor_seed=42, donor_values="score",
                  clamp=(0.0, 50.0), splice_dtype="sae", prompt_style="gemma-released")
RECIPES = {"default": DEFAULT, "released": RELEASED}


def get_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from its name (``"default"``, ``"released"``) or as is."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe in RECIPES:
        return RECIPES[recipe]
    raise InputError(f"unknown recipe {recipe!r}; expected one of {tuple(RECIPES)} or a Recipe")


def select(scores, K, which: str = "top", selection: str = "active", device=None) -> list[int]:
    """The Top-K (``which="top"``) or Bottom-K latents of ``scores`` (a
    :class:`~gradsae.model.PromptScores`; K an int or a fraction of the latents active at the
    last position) under a recipe's ``selection`` rule.

    ``"active"``: :meth:`PromptScores.top` / :meth:`PromptScores.bottom` with ``strict=False``
    (all candidates when fewer than K). ``"argsort"`` (the released code): Top-K is the first K
    of all ``d_sae`` latents sorted by descending score, so when fewer than K scores are
    positive it is padded with zero-score latents; Bottom-K is the first K of the non-zero
    scores sorted ascending (fewer when fewer).

    The padding is a choice among tied (zero) scores, and the released code leaves it to
    ``torch.argsort(scores, descending=True)``, an unstable sort, on the device the scores
    were computed on. The same call is made here, on ``device`` (default: where ``scores``
    lie; the experiments pass the model's device), so the order of ties is that sort's on that
    device, not a rule of its own (measured equal to the released code's on a CPU). Ties among
    non-zero Bottom-K scores are ordered by latent index."""
    if which not in ("top", "bottom"):
        raise InputError(f"which must be 'top' or 'bottom', got {which!r}")
    if selection not in SELECTIONS:
        raise InputError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "active":
        return (scores.top(K, False) if which == "top" else scores.bottom(K, False)).tolist()
    n = scores.resolve_k(K)
    s = scores.scores
    if which == "top":
        return torch.argsort(s.to(device or s.device), descending=True)[:n].cpu().tolist()
    nz = torch.nonzero(s).flatten()
    return nz[torch.argsort(s[nz], stable=True)][:n].tolist()


def clamp_values(values: dict, clamp) -> dict:
    """``{latent: value}`` with every value clamped to ``clamp`` ``(low, high)`` (None: as is)."""
    if clamp is None:
        return dict(values)
    lo, hi = float(clamp[0]), float(clamp[1])
    return {j: min(max(float(v), lo), hi) for j, v in values.items()}


@contextmanager
def splice_dtype(scorer, recipe):
    """Within the block, the splice of ``scorer`` (a :class:`gradsae.GradSAE`) returns the
    SAE's dtype when ``recipe``'s ``splice_dtype`` is ``"sae"``; restored after."""
    rec = get_recipe(recipe)
    sp = scorer.splice
    saved = sp.out_dtype
    if rec.splice_dtype == "sae":
        sp.out_dtype = scorer.sae.dtype
    try:
        yield
    finally:
        sp.out_dtype = saved


__all__ = ["DEFAULT", "RECIPES", "RELEASED", "Recipe", "clamp_values", "get_recipe", "select", "splice_dtype"]
