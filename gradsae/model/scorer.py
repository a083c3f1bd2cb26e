"""GradSAE on a transformers model: splice an SAE at a hook, run one forward and one backward
per batch, and read off activation x gradient for the active latents.

    scorer = GradSAE(model, sae, hook="blocks.6.hook_resid_post", tokenizer=tok)
    res = scorer.score("Question: ...", objective="predicted_prob")   # PromptScores
    res.top(0.5), res.bottom(10)
    attr = scorer.attribute(input_ids, attention_mask, objective="loss")  # per-token Influence
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..op import Influence, as_sae
from . import objectives as _obj
from .head import split_head
from .hooks import resolve_hook
from .interventions import Intervention
from .results import PromptScores, ScoreResult
from .splice import MODES, Splice
from .transformer_lens import adapt_model

REDUCES = ("mean", "sum", "last")
SIGNS = ("relu", "signed", "abs")


@dataclass
class Attribution:
    """One batch's attribution: ``influence`` (:class:`Influence` ``[B, T, K]``, empty slots and
    pad positions have index -1), ``mask`` (``[B, T]`` bool, the positions that count),
    ``logits`` (detached ``[B, T, V]``; None unless :meth:`GradSAE.attribute` was asked to
    keep them or needed them for a callable objective), ``objective`` (Y per example, ``[B]``)."""

    influence: Influence
    mask: torch.Tensor
    logits: torch.Tensor | None
    objective: torch.Tensor
    input_ids: torch.Tensor

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each example's last real token, ``[B]``."""
        return _obj.bounds(self.mask)[1]


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


class GradSAE:
    """An SAE spliced into ``model`` at ``hook``, scoring latents with GradSAE.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...)`` returning
            ``.logits``), or any module with the same call convention.
        sae: a :class:`gradsae.SAE` (moved to the model's device if needed).
        hook: a TransformerLens-style name (``blocks.L.hook_resid_post`` ...), a module path of
            the model, or None to use the SAE's own ``hook_name``.
        mode: ``"splice"`` (the model runs on the reconstruction, the paper) or ``"error"``
            (the reconstruction error is added back: the forward is the model's own).
        tokenizer: needed to score text; pads as configured (left or right).
        backend: influence backend for the encode, the sparse decode and the gather-dot
            (see :func:`gradsae.available_backends`).
        out_dtype: dtype of the spliced hook output (default None: the hook tensor's own
            dtype; see :class:`~gradsae.model.splice.Splice`).

    The SAE is spliced in only while a call (or an :meth:`intervene` block) runs. Model
    parameters never receive gradients, and backward stops at the hook.
    """

    def __init__(self, model, sae, hook: str | None = None, mode: str = "splice", tokenizer=None,
                 backend: str = "auto", out_dtype=None):
        sae = as_sae(sae)
        model, tokenizer = adapt_model(model, tokenizer)  # a TransformerLens HookedTransformer
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if hook is None:
            hook = sae.meta.hook_name
            if not hook:
                raise InputError("the SAE names no hook in its metadata; pass hook=...")
        self.model = model
        self.device = _device(model)
        self.sae = sae if sae.device == self.device else sae.to(device=self.device)
        self.point = resolve_hook(model, hook)
        if self.point.d_model is not None and self.point.d_model != self.sae.d_in:
            raise InputError(
                f"the SAE's d_in={self.sae.d_in} does not match the width {self.point.d_model} of "
                f"hook {hook!r} on this model; is this the SAE for this model?"
            )
        self.mode = mode
        self.tokenizer = tokenizer
        self.splice = Splice(self.point, self.sae, mode, backend, out_dtype=out_dtype)

    def __repr__(self) -> str:
        return f"GradSAE(hook={self.point.name!r} -> {self.point.module_path}, mode={self.mode!r}, sae={self.sae})"

    # ------------------------------------------------------------------ inputs
    def encode_batch(self, batch, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, T], mask [B, T] bool)`` from text, a list of texts, token ids, or a
        tokenizer's output."""
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(b, str) for b in batch):
            if self.tokenizer is None:
                raise InputError("scoring text needs a tokenizer: GradSAE(..., tokenizer=tok)")
            tok = self.tokenizer
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(list(batch), return_tensors="pt", padding=True)
            batch, attention_mask = enc["input_ids"], enc["attention_mask"]
        elif isinstance(batch, dict) or hasattr(batch, "keys"):
            attention_mask = batch.get("attention_mask", attention_mask)
            batch = batch["input_ids"]
        if isinstance(batch, (list, tuple)):
            try:
                batch = torch.as_tensor(batch, dtype=torch.long)
            except (ValueError, TypeError) as e:
                raise InputError(
                    "token id lists of different lengths: pad them and pass an attention_mask "
                    f"(or pass texts with a tokenizer) ({e})"
                ) from e
        if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError("input must be text, a list of texts, or integer token ids")
        ids = batch.long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(ids.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
            mask = mask.bool()
        _obj.bounds(mask)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, module=None, **kw):
        """The model's forward on a (possibly padded) batch, with position ids counted from each
        row's first real token, so padding changes nothing. ``module``: another module taking
        the same inputs (the model's body)."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return (module or self.model)(input_ids=ids, attention_mask=mask.long(), position_ids=pos, **kw)

    @contextmanager
    def _frozen(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ attribution
    def attribute(self, input_ids, attention_mask=None, objective="loss", position: int = -1,
                  keep_logits: bool = False, stats=None, deterministic: bool = False,
                  **objective_kwargs) -> Attribution:
        """Per-token influence of the active latents for a whole batch: one forward, one backward.

        ``objective``: ``"loss"`` (default), ``"predicted_prob"``, ``"logprob"`` (``target=``),
        ``"logit_diff"`` (``a=``, ``b=``) or a callable (see :mod:`gradsae.model.objectives`);
        ``position`` counts within each example's real tokens. Pad positions never count: their
        slots are empty in the result.

        On transformers models with a plain output head (:mod:`gradsae.model.head`) a named
        objective never forms the ``[B, T, vocab]`` logits: the head runs at the one position
        it needs, or the loss runs in chunks of positions. ``keep_logits=True`` runs the model's
        own forward instead and returns its logits in :attr:`Attribution.logits`.

        ``stats``: a :class:`~gradsae.LatentStats` the backward also adds the batch's influence
        into (real tokens only), fused into the gather-dot where a kernel backend serves
        (:meth:`Splice.recording`); ``deterministic``: bitwise repeatable sums there.
        """
        ids, mask = self.encode_batch(input_ids, attention_mask)
        recording = self.splice.recording(mask=mask, last_index=_obj.bounds(mask)[1], device=self.device,
                                          stats=stats, deterministic=deterministic)
        with self._frozen(), recording as rec, torch.enable_grad():
            head = None if keep_logits or callable(objective) else split_head(self.model)
            if head is not None:
                logits = None
                hidden = self.forward(ids, mask, module=head.body, use_cache=False).last_hidden_state
                y = _obj.evaluate_hidden(objective, head, hidden, ids, mask, position, **objective_kwargs)
            else:
                logits = self.forward(ids, mask, use_cache=False).logits
                y = _obj.evaluate(objective, logits, ids, mask, position, **objective_kwargs)
            if not y.requires_grad:
                raise InputError("the objective does not depend on the hook's output")
            y.sum().backward()
        done = rec.influences
        if len(rec.entries) != 1 or len(done) != 1:
            raise InputError(
                f"the hook {self.point.name!r} ran {len(rec.entries)} times in one forward; "
                "expected exactly once"
            )
        inf = done[0]
        keep = mask.unsqueeze(-1) & (inf.indices >= 0)
        z = lambda t: torch.where(keep, t, torch.zeros_like(t))
        inf = Influence(torch.where(keep, inf.indices, torch.full_like(inf.indices, -1)),
                        z(inf.acts), z(inf.grads), z(inf.scores), inf.d_sae)
        yv = y.detach().reshape(-1)
        if yv.numel() == 1 and ids.shape[0] > 1:  # a callable objective returned one scalar
            yv = yv.expand(ids.shape[0])
        return Attribution(inf, mask, None if logits is None else logits.detach(), yv, ids)

    def reduce(self, attr: Attribution, reduce: str = "mean", sign: str = "relu") -> ScoreResult:
        """Per-prompt scores from an :class:`Attribution`: ``sign`` in ``relu`` (the paper),
        ``signed``, ``abs``; ``reduce`` over positions in ``mean`` (the paper; over real
        tokens, inactive counting 0), ``sum``, ``last``."""
        if reduce not in REDUCES:
            raise InputError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        if sign not in SIGNS:
            raise InputError(f"sign must be one of {SIGNS}, got {sign!r}")
        inf, mask = attr.influence, attr.mask
        B, T, K = inf.indices.shape
        d = inf.d_sae
        s = inf.scores
        s = s.relu() if sign == "relu" else s.abs() if sign == "abs" else s
        last = attr.last_index
        at_last = torch.arange(T, device=mask.device).unsqueeze(0) == last.unsqueeze(1)
        valid = inf.indices >= 0
        slot = torch.where(valid, inf.indices, torch.full_like(inf.indices, d)).reshape(B, T * K)

        def scatter(vals, where):
            out = torch.zeros(B, d + 1, dtype=vals.dtype, device=vals.device)
            out.scatter_add_(1, slot, (vals * where.unsqueeze(-1)).reshape(B, T * K))
            return out[:, :d]

        n = mask.sum(-1, keepdim=True).to(s.dtype)
        w = at_last if reduce == "last" else mask
        tot = scatter(s, w)
        if reduce == "mean":
            tot = tot / n
        count = scatter(valid.to(s.dtype), mask)
        last_acts = scatter(inf.acts, at_last)
        mean_acts = scatter(inf.acts, mask) / n
        out = ScoreResult()
        for b in range(B):
            li = inf.indices[b, int(last[b])]
            out.append(PromptScores(
                scores=tot[b].cpu(), active=(count[b] > 0).cpu(),
                active_last=torch.sort(li[li >= 0]).values.cpu(),
                last_acts=last_acts[b].cpu(), mean_acts=mean_acts[b].cpu(),
                objective=float(attr.objective[b]),
            ))
        return out

    def score(self, batch_or_text, objective="predicted_prob", position: int = -1, reduce: str = "mean",
              sign: str = "relu", attention_mask=None, **objective_kwargs):
        """GradSAE scores per prompt. A single text (or 1-D ids) gives a :class:`PromptScores`;
        a batch gives a :class:`ScoreResult` (a list of them)."""
        single = isinstance(batch_or_text, str) or (
            isinstance(batch_or_text, torch.Tensor) and batch_or_text.dim() == 1)
        attr = self.attribute(batch_or_text, attention_mask, objective, position, **objective_kwargs)
        res = self.reduce(attr, reduce, sign)
        return res[0] if single else res

    # ------------------------------------------------------------------ interventions
    @contextmanager
    def intervene(self, zero=(), set=None, add=None, positions: str = "all"):
        """Splice the SAE with latent edits for every forward inside the block (see
        :mod:`gradsae.model.interventions`): ``zero`` latents, ``set`` {latent: value},
        ``add`` {latent: alpha} (``alpha * W_dec[latent]``), at ``"all"`` positions or the
        ``"last"``. Nested blocks combine."""
        zero = [int(j) for j in (zero.tolist() if isinstance(zero, torch.Tensor) else zero)]
        iv = Intervention(zero, dict(set or {}), dict(add or {}), positions).validate(self.sae.d_sae)
        with self.splice.editing(iv):
            yield iv

    @contextmanager
    def spliced(self):
        """Splice the SAE (no edits) for every forward inside the block."""
        with self.splice:
            yield self

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, max_new_tokens: int = 50, **kw):
        """Greedy generation on the spliced model; see :func:`gradsae.model.generation.generate`."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, **kw)

    def score_at_trigger(self, prompt, trigger="[", max_new_tokens: int = 50, trigger_at: str = "first", **kw):
        """The paper's scores: at the first greedy step whose predicted token contains
        ``trigger`` (``trigger_at="last"``: the last such step, as the released code stores);
        see :func:`gradsae.model.generation.score_at_trigger`."""
        from .generation import score_at_trigger

        return score_at_trigger(self, prompt, trigger=trigger, max_new_tokens=max_new_tokens, trigger_at=trigger_at,
                                **kw)
