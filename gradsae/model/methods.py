"""How good is the first-order score? Other attribution methods for the latents of one SAE at
one hook, on a :class:`~gradsae.model.scorer.GradSAE` and a batch.

GradSAE's score ``z * dY/dz`` is the first-order estimate of ``Y(z) - Y(z with z_j = 0)``.
This module computes, for the same spliced model and objective:

- ``ig`` (:func:`attribute_ig`): integrated gradients along the straight path from the zero
  baseline to z, at the SAE's latents. ``steps`` forward/backward passes, the latents of every
  token scaled by ``alpha_m = (m + 1/2) / steps`` (midpoint rule) inside the spliced forward;
  the score of slot ``(t, j)`` is ``z[t, j] * mean_m dY/dz[t, j](alpha_m z)``. The active set
  is that of the clean pass (the encode of the hook's input, which the scaling does not
  change), so memory stays ``O(T * k)`` per step. In error mode the error term stays at its
  clean value along the path. As ``steps`` grows the sum over all slots tends to
  ``Y(z) - Y(0)`` (completeness). With ``baseline=`` (a corrupt prompt), the path starts at
  its latents ``z'`` instead and the sum tends to ``Y(z) - Y(z')``.
- ``exact`` (:func:`score_exact`): zero-ablate one latent at every position of a prompt and
  measure ``Y(clean) - Y(ablated)``, many ablations per forward (the prompt repeated in the
  batch, one latent zeroed per row), at most ``budget`` ablations per prompt.
- the **error node** (:func:`attribute_grad`, error mode): ``(x - x_hat) . dY/d(hook output)``
  per token, the first-order score of the SAE's error term, in :attr:`Attribution.error`.
- a **counterfactual baseline** (attribution patching, :func:`attribute_grad` with
  ``baseline=``): ``(z_clean - z_corrupt) * dY/dz`` with the gradient at the clean prompt,
  positions aligned one to one (both prompts must have the same token count, as in Sparse
  Feature Circuits); in error mode the error node becomes ``(e_clean - e_corrupt) . D``.

Sign: every method estimates (or measures) ``Y(clean) - Y(without the latent)``, so a positive
value means the latent raises Y, as for the first-order score.

Nothing here changes the splice: edits of the active set go through the splice's
intervention mechanism (:meth:`Splice.editing` with an object that has ``positions`` and
``apply``), and the gradient at the hook's output is read by a second hook attached after the
splice.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager

import torch

from ..errors import GradSAEWarning, InputError
from ..op import Influence, encode_sparse, influence_at
from . import objectives as _obj
from .head import split_head

METHODS = ("grad", "ig", "exact")
DEFAULT_STEPS = 16
# ablated prompt copies per forward of ``exact``: at most this many tokens per forward
EXACT_TOKENS_PER_FORWARD = 8192


class _Stop(Exception):
    """Raised inside the splice once the active set of a forward has been captured."""


class _Edit:
    """An edit of the active set inside the spliced forward (what :meth:`Splice.editing`
    takes): ``fn(idx, acts) -> acts`` (None: unchanged); every call's ``(idx, acts, x)`` is
    kept in :attr:`seen`; ``stop``: abort the forward after capturing (the rest of the model
    is not needed)."""

    positions = "all"

    def __init__(self, fn=None, stop: bool = False, extra=None):
        self.fn, self.stop, self.extra = fn, stop, extra
        self.seen: list = []

    def apply(self, sae, idx, acts, x, pos):
        self.seen.append((idx, acts, x))
        if self.stop:
            raise _Stop
        new = acts if self.fn is None else self.fn(idx, acts)
        add = torch.zeros((), dtype=sae.dtype, device=acts.device) if self.extra is None else self.extra(sae, x)
        return new, add


@contextmanager
def _grad_at_hook(point):
    """Record ``dY/d(hook output)`` of every forward: a second hook at the same point, attached
    after the splice, sees the spliced output and registers a gradient hook on it."""
    grads: list = []

    def fn(t):
        if t.requires_grad:
            t.register_hook(lambda g: grads.append(g.detach()))
        return t

    handle = point.attach(fn)
    try:
        yield grads
    finally:
        handle.remove()


def check_method(method: str, steps) -> None:
    """``method`` is one of :data:`METHODS`; ``steps`` a positive int."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an int >= 1, got {steps!r}")


def _y_nograd(scorer, ids, mask, objective, position, kw) -> torch.Tensor:
    """The objective ``[B]`` of a forward without gradients (the splice attached by the
    caller), by the same path as :meth:`GradSAE.attribute`."""
    head = None if callable(objective) else split_head(scorer.model)
    if head is not None:
        hidden = scorer.forward(ids, mask, module=head.body, use_cache=False).last_hidden_state
        y = _obj.evaluate_hidden(objective, head, hidden, ids, mask, position, **kw)
    else:
        logits = scorer.forward(ids, mask, use_cache=False).logits
        y = _obj.evaluate(objective, logits, ids, mask, position, **kw)
    y = y.detach().reshape(-1)
    if y.numel() == 1 and ids.shape[0] > 1:
        raise InputError("this method runs several prompt copies per forward: a callable objective must return "
                         "one value per example ([batch]), not a scalar")
    return y


@contextmanager
def _nograd_splice(scorer, mask, edit):
    """The splice attached with ``edit`` and the batch's pad mask, no gradients."""
    sp = scorer.splice
    with torch.no_grad(), sp.recording(mask=mask, last_index=_obj.bounds(mask)[1], device=scorer.device), \
            sp.editing(edit):
        yield


def capture(scorer, ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx, acts, x)`` of the SAE at the hook for a batch: its active set ``[B, T, K]`` (pad
    positions empty) and the hook's input ``[B, T, d_in]`` (pads zeroed). The model runs only
    up to the hook."""
    edit = _Edit(stop=True)
    try:
        with _nograd_splice(scorer, mask, edit):
            scorer.forward(ids, mask, use_cache=False)
    except _Stop:
        pass
    if len(edit.seen) != 1:
        raise InputError(f"the hook {scorer.point.name!r} ran {len(edit.seen)} times in one forward; expected once")
    return edit.seen[0]


def _error_term(sae, idx, acts, x) -> torch.Tensor:
    """``x - x_hat`` ``[B, T, d_in]`` in the SAE's dtype."""
    return x.to(sae.dtype) - sae.decode_sparse(idx, acts, x=x)


def _merge_slots(idx_a, val_a, idx_b, val_b):
    """Slots ``a`` and ``b`` ``[..., Ka]``, ``[..., Kb]`` of the same tokens as one set
    ``[..., Ka + Kb]``: a latent present in both keeps one slot (in ``a``) with the sum of
    its values; the duplicate in ``b`` becomes empty (-1, 0)."""
    same = (idx_b.unsqueeze(-1) == idx_a.unsqueeze(-2)) & (idx_b >= 0).unsqueeze(-1)  # [..., Kb, Ka]
    add_a = (same.to(val_b.dtype) * val_b.unsqueeze(-1)).sum(-2)
    dup = same.any(-1)
    idx = torch.cat([idx_a, torch.where(dup, torch.full_like(idx_b, -1), idx_b)], -1)
    val = torch.cat([val_a + add_a, torch.where(dup, torch.zeros_like(val_b), val_b)], -1)
    return idx, val


def _corrupt_state(scorer, ids, mask, baseline, baseline_mask):
    """``(idx, acts, x)`` of the corrupt prompt(s) ``baseline`` at the hook, checked to align
    with the clean batch ``ids``/``mask`` position by position (one corrupt prompt serves a
    whole batch of clean prompts of its length)."""
    cids, cmask = scorer.encode_batch(baseline, baseline_mask)
    if cids.shape[0] == 1 and ids.shape[0] > 1:
        cids, cmask = cids.expand(ids.shape[0], -1), cmask.expand(ids.shape[0], -1)
    if cids.shape != ids.shape or not torch.equal(cmask, mask):
        n_clean, n_corrupt = mask.sum(-1).tolist(), cmask.sum(-1).tolist()
        raise InputError(
            "a counterfactual baseline aligns positions one to one, so it needs the same number of prompts "
            f"and of tokens per prompt (padded alike): clean {n_clean} tokens, baseline {n_corrupt}"
        )
    return capture(scorer, cids, cmask)


def _hook_grad(grads: list, sae) -> torch.Tensor:
    """The one recorded ``dY/d(hook output)``, as ``[B, T, d_in]`` in the SAE's dtype."""
    D = grads[0]
    if D.dim() == 4 and D.shape[-1] != sae.d_in:  # per-head hook (hook_z): the SAE reads them flattened
        D = D.flatten(-2)
    return D.to(sae.dtype)


def _union(inf: Influence, g_clean, pidx, pacts, g_corrupt, mask) -> Influence:
    """The clean slots of ``inf`` and the corrupt slots ``pidx`` as one set per token (a latent
    active in both keeps its clean slot): ``acts = z_clean - z_corrupt``, ``grads`` from
    ``g_clean`` (clean slots) and ``g_corrupt`` (corrupt slots), ``scores`` their product."""
    idx, delta = _merge_slots(inf.indices, inf.acts, pidx, -pacts.to(inf.acts.dtype))
    grads = torch.cat([g_clean.to(delta.dtype), g_corrupt.to(delta.dtype)], -1)
    valid = mask.unsqueeze(-1) & (idx >= 0)
    grads = torch.where(valid, grads, torch.zeros_like(grads))
    delta = torch.where(valid, delta, torch.zeros_like(delta))
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    return Influence(idx, delta, grads, delta * grads, inf.d_sae)


# ---------------------------------------------------------------------------- grad
def attribute_grad(scorer, input_ids, attention_mask=None, objective="loss", position: int = -1, *,
                   baseline=None, baseline_mask=None, error_node: bool = True, **kw):
    """The first-order attribution (:meth:`GradSAE.attribute`), plus, in error mode, the error
    node in :attr:`Attribution.error` ``[B, T]`` (``error_node=False``: not computed), and with
    ``baseline`` (a corrupt prompt or batch of the same token counts) the counterfactual
    scores ``(z_clean - z_corrupt) * dY/dz``.

    With a baseline the result's slots hold the union of the clean and the corrupt active sets
    of each token; ``acts`` is ``z_clean - z_corrupt`` there, ``grads`` dY/dz at the clean
    prompt, ``scores`` their product."""
    ids, mask = scorer.encode_batch(input_ids, attention_mask)
    want_error = error_node and scorer.mode == "error"
    if baseline is None and not want_error:
        return scorer.attribute(ids, mask, objective, position, error_node=False, **kw)
    corrupt = None
    if baseline is not None:
        if kw.get("stats") is not None:
            raise InputError("a statistics sink (stats=) takes first-order scores only; drop baseline=")
        corrupt = _corrupt_state(scorer, ids, mask, baseline, baseline_mask)
    cap = _Edit()
    sp = scorer.splice
    edited = bool(sp.interventions)  # inside an intervene() block: cap sees the edited latents
    with sp, sp.editing(cap), _grad_at_hook(scorer.point) as grads:
        attr = scorer.attribute(ids, mask, objective, position, error_node=False, **kw)
    if len(cap.seen) != 1 or len(grads) != 1:
        raise InputError(f"the hook {scorer.point.name!r} ran {len(cap.seen)} times in one forward; expected once")
    sae = scorer.sae
    idx, acts, x = cap.seen[0]
    D = _hook_grad(grads, sae)
    inf = attr.influence
    err = None
    if want_error:
        # the error term is that of the SAE's own latents, not of latents an intervention edited
        e = _error_term(sae, *encode_sparse(x, sae, backend=sp.backend), x) if edited else \
            _error_term(sae, idx, acts, x)
    if corrupt is not None:
        pidx, pacts, px = corrupt
        g_p = influence_at(pidx, pacts, D, sae, x=x, backend=sp.backend).grads  # dY/dz at clean, corrupt's latents
        inf = _union(inf, inf.grads, pidx, pacts, g_p, mask)
        if want_error:
            e = e - _error_term(sae, pidx, pacts, px)
    if want_error:
        err = torch.where(mask, (e * D).sum(-1), torch.zeros((), dtype=e.dtype, device=e.device))
    return dataclasses.replace(attr, influence=inf, influences={scorer.hooks[0]: inf}, error=err,
                               method="grad" if corrupt is None else "grad-baseline")


# ---------------------------------------------------------------------------- ig
def attribute_ig(scorer, input_ids, attention_mask=None, objective="loss", position: int = -1, *,
                 steps: int = DEFAULT_STEPS, baseline=None, stats=None, **kw):
    """Integrated gradients at the SAE's latents (module docstring): ``steps``
    forward/backward passes along the straight path from the baseline to the clean latents z,
    at ``alpha_m = (m + 1/2) / steps``. The baseline is zero (every active latent scaled by
    ``alpha_m``), or, with ``baseline=`` a corrupt prompt of the same token counts, its latents
    ``z'`` at the same positions (``z' + alpha_m (z - z')``: the clean slots scaled, the corrupt
    latents added to the hook's output with weight ``1 - alpha_m``; the slots then hold the
    union of both active sets, ``acts = z - z'``).

    Returns an :class:`Attribution` whose ``grads`` are the mean of dY/dz over the steps and
    ``scores = acts * grads``; ``objective`` is Y of the clean prompt (one more forward,
    without gradients)."""
    from .splice import delta_decode

    check_method("ig", steps)
    if stats is not None:
        raise InputError("a statistics sink (stats=) takes first-order scores only; use method='grad'")
    ids, mask = scorer.encode_batch(input_ids, attention_mask)
    corrupt = None if baseline is None else _corrupt_state(scorer, ids, mask, baseline, None)
    total, total_p, first = None, None, None
    sp, sae = scorer.splice, scorer.sae
    for m in range(steps):
        alpha = (m + 0.5) / steps
        extra = None
        if corrupt is not None:
            pidx, pacts, _ = corrupt
            extra = lambda sae_, x, w=1.0 - alpha: delta_decode(sae_, pidx, pacts * w, x)  # noqa: E731
        edit = _Edit(lambda idx, acts, a=alpha: acts * a, extra=extra)
        with sp, sp.editing(edit), _grad_at_hook(scorer.point) as grads:
            attr = scorer.attribute(ids, mask, objective, position, error_node=False, **kw)
        g = attr.influence.grads
        total = g.clone() if total is None else total + g
        if first is None:
            first = attr
            idx0, acts0, x0 = edit.seen[0]
        elif not torch.equal(attr.influence.indices, first.influence.indices):  # pragma: no cover - defensive
            raise InputError("the active set changed between integration steps (non-deterministic encode?)")
        if corrupt is not None:
            gp = influence_at(pidx, pacts, _hook_grad(grads, sae), sae, x=x0, backend=sp.backend).grads
            total_p = gp.clone() if total_p is None else total_p + gp
    keep = mask.unsqueeze(-1) & (idx0 >= 0)
    acts = torch.where(keep, acts0, torch.zeros_like(acts0)).to(total.dtype)
    grads = total / steps
    inf = Influence(first.influence.indices, acts, grads, acts * grads, first.influence.d_sae)
    if corrupt is not None:
        inf = _union(inf, grads, pidx, pacts, total_p / steps, mask)
    with _nograd_splice(scorer, mask, _Edit()):
        y = _y_nograd(scorer, ids, mask, objective, position, objective_kwargs(kw))
    return dataclasses.replace(first, influence=inf, influences={scorer.hooks[0]: inf}, objective=y, logits=None,
                               error=None,
                               method=f"ig{steps}" + ("" if corrupt is None else "-baseline"))


# ---------------------------------------------------------------------------- exact
def ablation_effects(scorer, ids, mask, latents: list, objective, position, kw,
                     tokens_per_forward: int = EXACT_TOKENS_PER_FORWARD):
    """``(y_clean [B], effects)``: ``effects[b]`` is ``Y_b(clean) - Y_b(latent j zeroed at every
    position)`` ``[len(latents[b])]`` for each latent of ``latents[b]``. Rows of one forward
    are copies of prompts, each with one latent zeroed (or none, for Y(clean)), at most
    ``tokens_per_forward`` tokens per forward."""
    B, T = ids.shape
    jobs = [(b, -1) for b in range(B)] + [(b, int(j)) for b in range(B) for j in latents[b]]
    rows = max(1, tokens_per_forward // T)
    ys = torch.empty(len(jobs), dtype=torch.float64)
    for s in range(0, len(jobs), rows):
        chunk = jobs[s:s + rows]
        bs = torch.tensor([b for b, _ in chunk], device=ids.device)
        lat = torch.tensor([j for _, j in chunk], device=ids.device)

        def zero(idx, acts, lat=lat):
            kill = (idx == lat.view(-1, *([1] * (idx.dim() - 1)))) & (idx >= 0)
            return torch.where(kill, torch.zeros_like(acts), acts)

        ri, rm = ids[bs], mask[bs]
        with _nograd_splice(scorer, rm, _Edit(zero)):
            kwb = {k: _rows(v, B, bs.tolist()) for k, v in kw.items()}
            ys[s:s + len(chunk)] = _y_nograd(scorer, ri, rm, objective, position, kwb).double().cpu()
    y_clean = ys[:B]
    effects, at = [], B
    for b in range(B):
        n = len(latents[b])
        effects.append(y_clean[b] - ys[at:at + n])
        at += n
    return y_clean, effects


def _rows(v, B: int, rows: list):
    """A per-example objective argument (one entry per prompt) taken at ``rows``; others as is."""
    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == B and B > 1:
        return v[torch.tensor(rows, device=v.device)]
    if isinstance(v, (list, tuple)) and len(v) == B and B > 1:
        return [v[r] for r in rows]
    return v


def score_exact(scorer, batch, attention_mask=None, objective="predicted_prob", position: int = -1, *,
                latents=10, budget: int | None = None, reduce: str = "mean", sign: str = "relu", **kw):
    """Exact zero-ablation effects per prompt (a :class:`ScoreResult`): ``scores[j] =
    Y(clean) - Y(latent j zeroed at every position)`` for the latents evaluated (``sign``
    applied: ``relu``, ``signed``, ``abs``), 0 for the others; ``evaluated`` marks which were.

    ``latents``: an int or a fraction K (each prompt's Top-K by the first-order score with
    ``reduce`` and ``sign``), a list of latent ids (the same for every prompt), or a list of such
    lists (one per prompt). ``budget``: at most this many ablations per prompt (the first ones
    of each list, which for a Top-K are the highest-ranked); the others are left out with a
    :class:`GradSAEWarning`. The other fields (``active``, activations) are those of the
    clean prompt."""
    from .results import ScoreResult

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise InputError(f"budget must be an int >= 1 (ablations per prompt) or None, got {budget!r}")
    if kw.get("stats") is not None:
        raise InputError("a statistics sink (stats=) takes first-order scores only; use method='grad'")
    ids, mask = scorer.encode_batch(batch, attention_mask)
    attr = scorer.attribute(ids, mask, objective, position, error_node=False, **kw)
    base = scorer.reduce(attr, reduce, sign)
    lists = resolve_latents(latents, base, scorer.sae.d_sae)
    if budget is not None and any(len(lat) > budget for lat in lists):
        cut = sum(max(0, len(lat) - budget) for lat in lists)
        warnings.warn(f"budget={budget} ablations per prompt: {cut} requested ablation(s) left out",
                      GradSAEWarning, stacklevel=3)
        lists = [lat[:budget] for lat in lists]
    y_clean, effects = ablation_effects(scorer, ids, mask, lists, objective, position, objective_kwargs(kw))
    out = ScoreResult()
    for b, p in enumerate(base):
        eff = effects[b].to(p.scores.dtype)
        eff = eff.relu() if sign == "relu" else eff.abs() if sign == "abs" else eff
        scores = torch.zeros_like(p.scores)
        evaluated = torch.zeros(p.d_sae, dtype=torch.bool)
        if lists[b]:
            j = torch.tensor(lists[b], dtype=torch.long)
            scores[j] = eff
            evaluated[j] = True
        out.append(dataclasses.replace(p, scores=scores, evaluated=evaluated, objective=float(y_clean[b]),
                                       error=None, method="exact"))
    return out


def resolve_latents(latents, base, d_sae: int) -> list[list[int]]:
    """One list of distinct latent ids per prompt from ``latents`` (see :func:`score_exact`)
    and the prompts' first-order :class:`PromptScores` ``base``."""
    if isinstance(latents, (int, float)) and not isinstance(latents, bool):
        return [p.top(latents, strict=False).tolist() for p in base]
    if isinstance(latents, torch.Tensor):
        latents = latents.tolist()
    if not isinstance(latents, (list, tuple)):
        raise InputError(f"latents must be K (an int or a fraction), a list of latent ids or one list per prompt, "
                         f"got {type(latents).__name__}")
    per_prompt = bool(latents) and all(isinstance(v, (list, tuple, torch.Tensor)) for v in latents)
    if per_prompt and len(latents) != len(base):
        raise InputError(f"latents has {len(latents)} lists for {len(base)} prompts")
    lists = [list(v.tolist() if isinstance(v, torch.Tensor) else v) for v in latents] if per_prompt else \
        [list(latents)] * len(base)
    out = []
    for lat in lists:
        if any(isinstance(j, bool) or not isinstance(j, int) for j in lat):
            raise InputError(f"latent ids must be ints, got {lat[:10]}")
        bad = [j for j in lat if not 0 <= j < d_sae]
        if bad:
            raise InputError(f"latent ids must be in [0, {d_sae}), got {bad[:10]}")
        out.append(list(dict.fromkeys(lat)))
    return out


_NOT_OBJECTIVE = ("keep_logits", "stats", "deterministic")


def objective_kwargs(kw: dict) -> dict:
    """The objective's own keyword arguments among :meth:`GradSAE.attribute`'s."""
    return {k: v for k, v in kw.items() if k not in _NOT_OBJECTIVE}
