"""Scalar objectives Y of a model's logits, one value per example.

Every objective returns ``[B]``; the scorer back-propagates their sum, so each example's
gradient is that of its own objective (examples do not interact) and a batch gives the same
results as its examples one by one. Positions are counted within each example's non-pad
tokens: ``position=-1`` is its last real token, ``0`` its first, whichever side is padded.

- ``predicted_prob``: softmax probability of the argmax next token at ``position`` (the paper);
- ``logprob``: log-probability of ``target`` (a token id, or one per example) at ``position``;
- ``loglik``: mean log-probability of each actual next token over the example's real tokens
  (``-loss``; the corpus default: a positive influence helps the model predict the text);
- ``loss``: mean next-token NLL over the example's real tokens;
- ``logit_diff``: ``logit[a] - logit[b]`` at ``position``;
- any callable ``fn(logits, input_ids, mask) -> [B]`` (or a scalar).

The sign of an influence ``z * dY/dz`` follows Y: positive means the latent pushes Y up.
:data:`MEANING` says in words what Y is and what a positive influence means for each name.
"""

from __future__ import annotations

import torch

from ..errors import InputError

NAMES = ("predicted_prob", "logprob", "loglik", "loss", "logit_diff")
# Objectives over every next-token prediction of a sequence (they need 2 real tokens).
SEQUENCE_OBJECTIVES = ("loglik", "loss")

# name -> (what Y is, what a positive influence on it means), for meta.json, reports and help.
MEANING = {
    "loglik": ("the mean log-probability of each actual next token",
               "the latent helps the model predict the next token"),
    "loss": ("the mean next-token cross-entropy loss",
             "the latent raises the loss: it hurts the prediction of the next token"),
    "predicted_prob": ("the probability of the model's own (argmax) next token at the position",
                       "the latent makes the model's prediction more likely"),
    "logprob": ("the log-probability of the target token at the position",
                "the latent makes the target token more likely"),
    "logit_diff": ("logit[a] - logit[b] at the position",
                   "the latent favours token a over token b"),
}


def meaning(objective) -> dict:
    """``{"objective", "y", "positive"}``: the objective's name and, in words, what Y is and
    what a positive influence means (a callable: its qualified name, sign as Y's)."""
    if isinstance(objective, str) and objective in MEANING:
        y, pos = MEANING[objective]
        return {"objective": objective, "y": y, "positive": pos}
    name = objective if isinstance(objective, str) else (
        f"{getattr(objective, '__module__', '')}.{getattr(objective, '__qualname__', type(objective).__name__)}")
    return {"objective": name, "y": f"the value of {name}", "positive": "the latent raises Y"}


def bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last real position of each row of ``mask`` ``[B, T]`` (left or right padding)."""
    if not bool(mask.any(-1).all()):
        raise InputError("an example has no real tokens (its attention_mask is all 0)")
    T = mask.shape[1]
    ar = torch.arange(T, device=mask.device)
    first = torch.where(mask, ar, T).min(-1).values
    last = torch.where(mask, ar, -1).max(-1).values
    return first, last


def position_index(mask: torch.Tensor, position: int) -> torch.Tensor:
    """Absolute index ``[B]`` of ``position`` counted within each row's real tokens."""
    first, last = bounds(mask)
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"position must be an int, got {position!r}")
    pos = first + position if position >= 0 else last + 1 + position
    if bool((pos < first).any() | (pos > last).any()):
        n = int((last - first + 1).min())
        raise InputError(f"position {position} is outside an example of {n} tokens")
    return pos


def _at(logits, mask, position):
    pos = position_index(mask, position)
    return logits[torch.arange(logits.shape[0], device=logits.device), pos.to(logits.device)]


def _token_ids(name, v, B, device):
    if v is None:
        raise InputError(f"this objective needs {name}=<token id> (an int or one per example)")
    t = torch.as_tensor(v, dtype=torch.long, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise InputError(f"{name} has {t.numel()} entries for a batch of {B}")
    return t


def evaluate(objective, logits, input_ids, mask, position: int = -1, **kw) -> torch.Tensor:
    """The objective ``[B]`` for ``logits`` ``[B, T, V]`` (float32 or better)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    B = logits.shape[0]
    if callable(objective):
        y = objective(logits, input_ids, mask, **kw)
        if not isinstance(y, torch.Tensor) or y.dim() > 1 or (y.dim() == 1 and y.shape[0] != B):
            raise InputError("a callable objective must return a scalar or a [batch] tensor")
        return y
    _check_arguments(objective, kw)
    if objective == "predicted_prob":
        p = _at(logits, mask, position).softmax(-1)
        return p.max(-1).values
    if objective == "logprob":
        t = _token_ids("target", kw.get("target"), B, logits.device)
        return _at(logits, mask, position).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    if objective == "logit_diff":
        a = _token_ids("a", kw.get("a"), B, logits.device)
        b = _token_ids("b", kw.get("b"), B, logits.device)
        lg = _at(logits, mask, position)
        return lg.gather(-1, a[:, None]).squeeze(-1) - lg.gather(-1, b[:, None]).squeeze(-1)
    if objective in SEQUENCE_OBJECTIVES:
        lp = logits[:, :-1].log_softmax(-1)
        nll = -lp.gather(-1, input_ids[:, 1:, None].to(lp.device)).squeeze(-1)
        valid, n = _loss_positions(mask, objective)
        loss = (nll * valid.to(nll.dtype)).sum(-1) / n.to(nll.dtype)
        return loss if objective == "loss" else -loss
    raise InputError(f"unknown objective {objective!r}; expected one of {NAMES} or a callable")


# the token arguments each named objective takes (besides ``position``)
ARGUMENTS = {"predicted_prob": (), "loss": (), "loglik": (), "logprob": ("target",), "logit_diff": ("a", "b")}


def _check_arguments(objective, kw) -> None:
    if objective in ARGUMENTS:
        extra = sorted(set(kw) - set(ARGUMENTS[objective]))
        if extra:
            raise InputError(f"objective {objective!r} takes no argument(s) {extra}")


def _loss_positions(mask: torch.Tensor, objective: str = "loss") -> tuple[torch.Tensor, torch.Tensor]:
    """``valid [B, T-1]`` (position t predicts real token t+1) and its count per example."""
    valid = mask[:, :-1] & mask[:, 1:]
    n = valid.sum(-1)
    if bool((n == 0).any()):
        raise InputError(f"objective {objective!r} needs at least 2 real tokens per example")
    return valid, n


def evaluate_hidden(objective, head, hidden, input_ids, mask, position: int = -1, **kw) -> torch.Tensor:
    """The named ``objective`` ``[B]`` from the final hidden states ``[B, T, d]`` and the model's
    :class:`~gradsae.model.head.Head`, equal to :func:`evaluate` on the model's logits without
    forming them: the position objectives apply the head at one position per example; ``loss``
    and ``loglik`` are :func:`~gradsae.model.head.chunked_nll` over the predicting positions
    only (``loglik`` with the weights negated)."""
    from .head import chunked_nll

    if objective not in NAMES:
        raise InputError(f"unknown objective {objective!r}; expected one of {NAMES} or a callable")
    _check_arguments(objective, kw)
    B = hidden.shape[0]
    if objective in SEQUENCE_OBJECTIVES:
        valid, n = _loss_positions(mask.to(hidden.device), objective)
        rows, cols = valid.nonzero(as_tuple=True)
        targets = input_ids.to(hidden.device)[rows, cols + 1]
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        weights = 1.0 / n.to(acc)[rows]
        if objective == "loglik":  # sum of w * log p = -(sum of w * NLL)
            weights = -weights
        return chunked_nll(head, hidden[rows, cols], targets, weights, rows, B)
    pos = position_index(mask, position).to(hidden.device)
    h = hidden[torch.arange(B, device=hidden.device), pos].unsqueeze(1)  # [B, 1, d]
    one = torch.ones(B, 1, dtype=torch.bool, device=mask.device)
    return evaluate(objective, head.logits(h), input_ids, one, -1, **kw)
