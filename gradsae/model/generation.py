"""Greedy generation on the spliced model, and the paper's scoring step.

The paper scores latents at the step where greedy generation is about to emit its answer
marker: a predicted token containing ``[`` (the prompt asks for ``Result = [[ label ]]``).
:func:`generate` runs greedy decoding with the KV cache (transformers' ``generate`` when the
model has it, else a step-by-step loop); at the generated token that matches the trigger, one
forward and one backward on the full prefix at that step give the scores (``predicted_prob``
at the last position: the probability of exactly that token).

Which matching step is scored is ``trigger_at``: ``"first"`` (the default: the step that
opens the answer marker) or ``"last"`` (what the authors' released code stores: it scores at
every matching step and keeps the last, so an answer that emits ``[[`` twice is scored at the
second).

Interventions limited to the last position re-run the full prefix at every step (no cache),
as the released code does, so that only the current last token is edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .results import PromptScores


STOP_REASONS = ("length", "stop_token", "trigger")
TRIGGER_AT = ("first", "last")


@dataclass
class Generation:
    """``prompt_ids`` ``[T0]``, the generated ``token_ids`` ``[n]``, their ``text`` (with a
    tokenizer), and, when a trigger fired, the ``scores`` at that step and its index
    ``trigger_step`` (the number of tokens generated before it). ``stop_reason`` says why
    generation ended: ``"length"`` (``max_new_tokens`` reached), ``"stop_token"`` (an EOS /
    stop id was generated, the last of ``token_ids``) or ``"trigger"`` (``stop_at_trigger``)."""

    prompt_ids: torch.Tensor
    token_ids: torch.Tensor
    text: str | None = None
    scores: PromptScores | None = None
    trigger_step: int | None = None
    stop_reason: str = "length"


def _matcher(trigger, tokenizer):
    if trigger is None:
        return None
    if callable(trigger):
        return trigger
    if isinstance(trigger, str):
        if tokenizer is None:
            raise InputError("a text trigger needs a tokenizer: GradSAE(..., tokenizer=tok)")
        return lambda tok: trigger in tokenizer.decode([tok])
    raise InputError(f"trigger must be a string or a callable(token_id) -> bool, got {trigger!r}")


def default_stop_ids(scorer) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (e.g. Gemma's
    ``<end_of_turn>``, at which the released code also stops)."""
    out = []
    cands = [getattr(scorer.tokenizer, "eos_token_id", None),
             getattr(getattr(scorer.model, "generation_config", None), "eos_token_id", None)]
    for eos in cands:
        if eos is None:
            continue
        out += [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return sorted(set(out))


def _prompt_ids(scorer, prompt) -> torch.Tensor:
    ids, mask = scorer.encode_batch(prompt)
    if ids.shape[0] != 1:
        raise InputError("generation takes one prompt at a time")
    return ids[0][mask[0]]


def _uses_hf_generate(model) -> bool:
    return callable(getattr(model, "generate", None)) and getattr(model, "generation_config", None) is not None


def _hf_greedy(scorer, ids, max_new_tokens, stop, use_cache, stop_when):
    """Greedy decoding with transformers' own ``generate`` (its cache handling is right for
    every architecture and version), with a fresh generation config: no sampling, no
    penalties from the model's defaults."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            hit = bool(stop_when(int(input_ids[0, -1])))
            return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)

    pad = getattr(scorer.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(stop) if stop else 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=use_cache,
                           eos_token_id=sorted(stop) or None, pad_token_id=pad)
    crit = StoppingCriteriaList([_Stop()]) if stop_when is not None else None
    out = scorer.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                stopping_criteria=crit)
    return out[0, ids.shape[1]:]


def _loop_greedy(scorer, ids, max_new_tokens, stop, use_cache, stop_when, progress):
    """Greedy decoding step by step, for models without ``generate`` (KV cache when the model
    returns one)."""
    n0 = ids.shape[1]
    past = None
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", leave=False)
    for _ in steps:
        with torch.no_grad():
            if use_cache and past is not None:
                out = scorer.model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
            else:
                out = scorer.model(input_ids=ids, use_cache=use_cache)
        past = getattr(out, "past_key_values", None) if use_cache else None
        nxt = int(out.logits[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
        if nxt in stop or (stop_when is not None and stop_when(nxt)):
            break
    return ids[0, n0:]


def generate(scorer, prompt, max_new_tokens: int = 50, trigger=None, stop_at_trigger: bool = False,
             stop_ids=None, use_cache: bool | None = None, reduce: str = "mean", sign: str = "relu",
             progress: bool = False, trigger_at: str = "first") -> Generation:
    """Greedy decoding of ``prompt`` (text or 1-D ids) on the spliced model.

    Greedy decoding is deterministic, so the trigger step is found in the generated tokens
    (the first, or with ``trigger_at="last"`` the last, whose text contains ``trigger``) and
    scored afterwards with one forward and one backward on the prompt plus the tokens before
    it: exactly the prefix the model saw when it predicted the trigger.

    Args:
        trigger: a string (score at a predicted token whose text contains it) or a callable
            ``token_id -> bool``; None: no scoring.
        trigger_at: ``"first"`` (default) or ``"last"`` matching step (the released code's
            stored selection; needs the whole generation, so not with ``stop_at_trigger``).
        stop_at_trigger: stop as soon as the trigger fired (the token is not kept).
        stop_ids: token ids that end generation (default: :func:`default_stop_ids`).
        use_cache: KV cache (default: on, off under a last-position intervention).
        progress: a progress bar over steps (step-by-step decoding only).
    """
    if trigger_at not in TRIGGER_AT:
        raise InputError(f"trigger_at must be one of {TRIGGER_AT}, got {trigger_at!r}")
    if trigger_at == "last" and stop_at_trigger:
        raise InputError("trigger_at='last' needs the whole generation; it cannot stop at the trigger")
    tok = scorer.tokenizer
    match = _matcher(trigger, tok)
    stop = set(default_stop_ids(scorer) if stop_ids is None else (int(s) for s in stop_ids))
    sp = scorer.splice
    if use_cache is None:
        use_cache = not sp.edits_last_position
    prompt_ids = _prompt_ids(scorer, prompt)
    ids = prompt_ids.unsqueeze(0)
    stop_when = match if (match is not None and stop_at_trigger) else None
    scores, step_hit = None, None
    with sp:
        if _uses_hf_generate(scorer.model):
            gen = _hf_greedy(scorer, ids, max_new_tokens, stop, use_cache, stop_when)
        else:
            gen = _loop_greedy(scorer, ids, max_new_tokens, stop, use_cache, stop_when, progress)
        reason = "stop_token" if gen.numel() and int(gen[-1]) in stop else "length"
        if match is not None:
            hits = (i for i, t in enumerate(gen.tolist()) if match(t))
            if trigger_at == "first":
                step_hit = next(hits, None)
            else:
                step_hit = max(hits, default=None)
            if step_hit is not None:
                prefix = torch.cat([prompt_ids, gen[:step_hit]])
                scores = scorer.score(prefix, objective="predicted_prob", position=-1, reduce=reduce, sign=sign)
                if stop_at_trigger:
                    gen = gen[:step_hit]
                    reason = "trigger"
    gen = gen.cpu()
    text = tok.decode(gen.tolist(), skip_special_tokens=True) if tok is not None else None
    return Generation(prompt_ids.cpu(), gen, text, scores, step_hit, reason)


def score_at_trigger(scorer, prompt, trigger="[", max_new_tokens: int = 50, trigger_at: str = "first",
                     **kw) -> Generation:
    """Generate greedily until the predicted token matches ``trigger`` and score there (the
    first matching step; with ``trigger_at="last"`` generation runs to its end and the last
    matching step is scored, as the released code's stored selection is, and ``token_ids``
    holds the whole generation). Raises :class:`InputError` when it never matches, saying
    whether generation stopped early at an end-of-sequence token or used all
    ``max_new_tokens``."""
    g = generate(scorer, prompt, max_new_tokens=max_new_tokens, trigger=trigger,
                 stop_at_trigger=trigger_at == "first", trigger_at=trigger_at, **kw)
    if g.scores is None:
        n = len(g.token_ids)
        if g.stop_reason == "stop_token":
            stop = int(g.token_ids[-1])
            name = f" {scorer.tokenizer.decode([stop])!r}" if scorer.tokenizer is not None else ""
            early = "early " if n < max_new_tokens else ""
            raise InputError(
                f"the model never predicted a token matching the trigger {trigger!r}: generation stopped {early}at "
                f"the end-of-sequence token{name} (id {stop}) after {n} generated tokens, out of "
                f"max_new_tokens={max_new_tokens}; check that the prompt asks for the answer format"
            )
        raise InputError(
            f"the model never predicted a token matching the trigger {trigger!r} in max_new_tokens="
            f"{max_new_tokens} generated tokens; raise max_new_tokens or check that the prompt asks for the "
            "answer format"
        )
    return g
