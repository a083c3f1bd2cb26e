"""Greedy generation on the spliced model, and the paper's scoring step.

The paper scores latents at the step where greedy generation is about to emit its answer
marker: the first predicted token containing ``[`` (the prompt asks for ``Result = [[ label ]]``).
:func:`generate` runs greedy decoding with the KV cache; when the predicted token matches the
trigger, one forward and one backward on the full prefix at that step give the scores
(``predicted_prob`` at the last position: the probability of exactly that token).

Interventions limited to the last position re-run the full prefix at every step (no cache),
as the released code does, so that only the current last token is edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .results import PromptScores


@dataclass
class Generation:
    """``prompt_ids`` ``[T0]``, the generated ``token_ids`` ``[n]``, their ``text`` (with a
    tokenizer), and, when a trigger fired, the ``scores`` at that step and its index
    ``trigger_step`` (the number of tokens generated before it)."""

    prompt_ids: torch.Tensor
    token_ids: torch.Tensor
    text: str | None = None
    scores: PromptScores | None = None
    trigger_step: int | None = None


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


def generate(scorer, prompt, max_new_tokens: int = 50, trigger=None, stop_at_trigger: bool = False,
             stop_ids=None, use_cache: bool | None = None, reduce: str = "mean", sign: str = "relu",
             progress: bool = False) -> Generation:
    """Greedy decoding of ``prompt`` (text or 1-D ids) on the spliced model.

    Args:
        trigger: a string (score at the first predicted token whose text contains it) or a
            callable ``token_id -> bool``; None: no scoring.
        stop_at_trigger: stop as soon as the trigger fired (the token is not appended).
        stop_ids: token ids that end generation (default: :func:`default_stop_ids`).
        use_cache: KV cache (default: on, off under a last-position intervention).
    """
    tok = scorer.tokenizer
    match = _matcher(trigger, tok)
    stop = set(default_stop_ids(scorer) if stop_ids is None else (int(s) for s in stop_ids))
    sp = scorer.splice
    if use_cache is None:
        use_cache = not any(iv.positions == "last" for iv in sp.interventions)
    ids = _prompt_ids(scorer, prompt).unsqueeze(0)
    n0 = ids.shape[1]
    scores, step_hit = None, None
    past = None
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", leave=False)
    with sp:
        for step in steps:
            with torch.no_grad():
                if use_cache and past is not None:
                    out = scorer.model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
                else:
                    out = scorer.model(input_ids=ids, use_cache=use_cache)
            past = out.past_key_values if use_cache else None
            nxt = int(out.logits[0, -1].argmax())
            if match is not None and scores is None and match(nxt):
                scores = scorer.score(ids[0], objective="predicted_prob", position=-1, reduce=reduce, sign=sign)
                step_hit = step
                if stop_at_trigger:
                    break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
            if nxt in stop:
                break
    gen = ids[0, n0:].cpu()
    text = tok.decode(gen.tolist(), skip_special_tokens=True) if tok is not None else None
    return Generation(ids[0, :n0].cpu(), gen, text, scores, step_hit)


def score_at_trigger(scorer, prompt, trigger="[", max_new_tokens: int = 50, **kw) -> Generation:
    """Generate greedily until the predicted token matches ``trigger`` and score there (the
    paper's step). Raises :class:`InputError` when it never does within ``max_new_tokens``."""
    g = generate(scorer, prompt, max_new_tokens=max_new_tokens, trigger=trigger, stop_at_trigger=True, **kw)
    if g.scores is None:
        raise InputError(
            f"the model never predicted a token matching the trigger {trigger!r} within "
            f"{len(g.token_ids)} generated tokens (max_new_tokens={max_new_tokens}); "
            "raise max_new_tokens or check the prompt asks for the answer format"
        )
    return g
