"""GradSAE on a transformers model: splice an SAE at a hook, run one forward and one backward
per batch, and read off activation x gradient for the active latents.

    scorer = GradSAE(model, sae, hook="blocks.6.hook_resid_post", tokenizer=tok)
    res = scorer.score("Question: ...", objective="predicted_prob")   # PromptScores
    res.top(0.5), res.bottom(10)
    attr = scorer.attribute(input_ids, attention_mask, objective="loss")  # per-token Influence

Many SAEs in one forward and one backward (a list, hooks from each SAE's metadata or
``hooks=``, or a ``{hook: sae}`` mapping):

    scorer = GradSAE(model, {"blocks.3.hook_resid_post": sae3, "blocks.6.hook_resid_post": sae6})
    attr = scorer.attribute(ids)            # attr.influences: {hook: Influence}
    scorer.score(text)                      # {hook: PromptScores}
    with scorer.intervene({"blocks.3.hook_resid_post": [12, 40]}): ...
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..op import Influence, as_sae
from . import objectives as _obj
from .head import split_head
from .hooks import resolve_hook
from .interventions import Intervention
from .results import PromptScores, ScoreResult
from .splice import MODES, Splice, SpliceGroup
from .transformer_lens import adapt_model

REDUCES = ("mean", "sum", "last")
SIGNS = ("relu", "signed", "abs")


@dataclass
class Attribution:
    """One batch's attribution: ``influence`` (:class:`Influence` ``[B, T, K]``, empty slots and
    pad positions have index -1), ``mask`` (``[B, T]`` bool, the positions that count),
    ``logits`` (detached ``[B, T, V]``; None unless :meth:`GradSAE.attribute` was asked to
    keep them or needed them for a callable objective), ``objective`` (Y per example, ``[B]``),
    ``influences`` (``{hook: Influence}``, every SAE's, in the scorer's order; ``influence``
    is the first one); ``error`` (``[B, T]``, error mode with one SAE: the score
    ``(x - x_hat) . dY/dx_hat`` of the SAE's error term per token, else None) and ``method``
    (see :mod:`gradsae.model.methods`)."""

    influence: Influence
    mask: torch.Tensor
    logits: torch.Tensor | None
    objective: torch.Tensor
    input_ids: torch.Tensor
    influences: dict = field(default_factory=dict)
    error: torch.Tensor | None = None
    method: str = "grad"

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each example's last real token, ``[B]``."""
        return _obj.bounds(self.mask)[1]


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def _sae_list(saes, hook, hooks) -> tuple[list[tuple[str, object]], bool]:
    """``([(hook, sae), ...], multi)`` from the forms :class:`GradSAE` accepts."""
    if isinstance(saes, Mapping):
        if hook is not None or hooks is not None:
            raise InputError("a {hook: sae} mapping names its hooks; do not also pass hook= or hooks=")
        if not saes:
            raise InputError("the {hook: sae} mapping is empty; pass at least one SAE")
        return [(h, as_sae(sv)) for h, sv in saes.items()], True
    if isinstance(saes, (list, tuple)):
        if hook is not None:
            raise InputError("several SAEs take hooks=[...] (one per SAE), not hook=")
        if not saes:
            raise InputError("the list of SAEs is empty; pass at least one SAE")
        items = [as_sae(sv) for sv in saes]
        if hooks is None:
            hooks = [sv.meta.hook_name for sv in items]
            missing = [i for i, h in enumerate(hooks) if not h]
            if missing:
                raise InputError(f"the SAEs at positions {missing} name no hook in their metadata; pass hooks=[...]")
        hooks = list(hooks)
        if len(hooks) != len(items):
            raise InputError(f"hooks= names {len(hooks)} hooks for {len(items)} SAEs; pass one per SAE")
        return list(zip(hooks, items)), True
    if hooks is not None:
        raise InputError("hooks= is for a list of SAEs; one SAE takes hook=")
    sae = as_sae(saes)
    if hook is None:
        hook = sae.meta.hook_name
        if not hook:
            raise InputError("the SAE names no hook in its metadata; pass hook=...")
    return [(hook, sae)], False


class GradSAE:
    """An SAE spliced into ``model`` at ``hook`` (or several SAEs at several hooks), scoring
    latents with GradSAE.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...)`` returning
            ``.logits``), or any module with the same call convention.
        sae: a :class:`gradsae.SAE` (moved to the model's device if needed); or several: a
            list of SAEs (at the hooks their metadata names, or at ``hooks=``) or a
            ``{hook: sae}`` mapping.
        hook: a TransformerLens-style name (``blocks.L.hook_resid_post`` ...), a module path of
            the model, or None to use the SAE's own ``hook_name``.
        mode: ``"splice"`` (the model runs on the reconstruction, the paper) or ``"error"``
            (the reconstruction error is added back: the forward is the model's own).
        tokenizer: needed to score text; pads as configured (left or right).
        backend: influence backend for the encode, the sparse decode and the gather-dot
            (see :func:`gradsae.available_backends`).
        hooks: the hooks of a list of SAEs, one per SAE.
        hook_out: for a transcoder (``sae.transcoder``), the hook its output stands for (None:
            the SAE's ``meta.hook_name_out``, else the ``hook_mlp_out`` of ``hook``'s layer, or
            for a module path the module's own output); ``hook`` is then where it reads
            (:mod:`gradsae.model.transcoder`). Several SAEs: each transcoder's own metadata.
        out_dtype: dtype of the spliced hook output (default None: the hook tensor's own
            dtype; see :class:`~gradsae.model.splice.Splice`); SAEs, not transcoders.

    ``sae``, ``point``: the (first) SAE and its hook point; ``saes``, ``points``, ``splices``:
    ``{hook: ...}`` of every SAE; ``splice``: the :class:`Splice` (several SAEs: a
    :class:`SpliceGroup` of them all, so that generation runs with every SAE in place).

    The SAE is spliced in only while a call (or an :meth:`intervene` block) runs. Model
    parameters never receive gradients, and backward stops at the (first) hook.

    With several SAEs, one forward and one backward give every SAE's influence
    (:attr:`Attribution.influences`), :meth:`score` returns ``{hook: result}`` and
    :meth:`intervene` takes ``{hook: latents}``. In error mode each hook's output is the
    model's own, so every SAE's scores are exactly those of a run with that SAE alone. In
    splice mode every SAE is spliced at once: a later SAE encodes the output of a model that
    already runs on the earlier SAEs' reconstructions, and the gradient at an earlier SAE
    flows through the later SAEs' reconstructions (and encoders). Memory above the model grows
    by the active sets, ``O(tokens * k)`` per SAE.
    """

    def __init__(self, model, sae, hook: str | None = None, mode: str = "splice", tokenizer=None,
                 backend: str = "auto", hooks=None, hook_out: str | None = None, out_dtype=None):
        pairs, multi = _sae_list(sae, hook, hooks)
        if hook_out is not None and multi:
            raise InputError("hook_out= is for one transcoder; several take each one's meta.hook_name_out")
        model, tokenizer = adapt_model(model, tokenizer)  # a TransformerLens HookedTransformer
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        names = [h for h, _ in pairs]
        dup = sorted({h for h in names if names.count(h) > 1})
        if dup:
            raise InputError(f"hooks {dup} are given more than one SAE; one SAE per hook")
        self.model = model
        self.device = _device(model)
        self.mode = mode
        self.tokenizer = tokenizer
        self.multi = multi
        self.saes, self.points, self.splices = {}, {}, {}
        for h, sv in pairs:
            sv = sv if sv.device == self.device else sv.to(device=self.device)
            if sv.transcoder:  # reads hook h, stands for hook_out
                from .transcoder import TranscoderSplice

                if out_dtype is not None:
                    raise InputError("out_dtype= is for SAEs; a transcoder's output keeps the MLP output's dtype")
                self.splices[h] = TranscoderSplice.build(model, sv, h, hook_out, mode, backend)
                self.saes[h], self.points[h] = sv, self.splices[h].point_in
                continue
            point = resolve_hook(model, h)
            if point.d_model is not None and point.d_model != sv.d_in:
                raise InputError(
                    f"the SAE's d_in={sv.d_in} does not match the width {point.d_model} of "
                    f"hook {h!r} on this model; is this the SAE for this model?"
                )
            self.saes[h], self.points[h] = sv, point
            self.splices[h] = Splice(point, sv, mode, backend, out_dtype=out_dtype)
        first = names[0]
        self.sae, self.point = self.saes[first], self.points[first]
        # what generation attaches: the one splice, or every SAE's at once
        self.splice = SpliceGroup(self.splices.values()) if multi else self.splices[first]

    @property
    def hooks(self) -> list[str]:
        """The hooks, in the order the SAEs were given."""
        return list(self.splices)

    def __repr__(self) -> str:
        if self.multi:
            inner = ", ".join(f"{h!r}: {sv}" for h, sv in self.saes.items())
            return f"GradSAE({{{inner}}}, mode={self.mode!r})"
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
                  method: str = "grad", steps: int = 16, baseline=None, error_node: bool = True,
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

        ``method``: ``"grad"`` (the first-order score) or ``"ig"`` (integrated gradients with
        ``steps`` passes, from zero or from ``baseline``); ``baseline``: a corrupt prompt (batch)
        of the same token counts, for attribution patching ``(z_clean - z_corrupt) * dY/dz``
        with ``"grad"``; in error mode :attr:`Attribution.error` holds the error node unless
        ``error_node=False``. See :mod:`gradsae.model.methods`.
        """
        other = method != "grad" or baseline is not None
        if other:
            self.require_one_sae(f"method={method!r}" if method != "grad" else "baseline=")
        if other or (error_node and self.mode == "error" and not self.multi and not self.sae.transcoder):
            from .methods import attribute_grad, attribute_ig, check_method

            check_method(method, steps)
            kw = dict(keep_logits=keep_logits, stats=stats, deterministic=deterministic, **objective_kwargs)
            if method == "exact":
                raise InputError("method='exact' measures whole-prompt ablations: use score(..., method='exact')")
            if method == "ig":
                return attribute_ig(self, input_ids, attention_mask, objective, position, steps=steps,
                                    baseline=baseline, **kw)
            return attribute_grad(self, input_ids, attention_mask, objective, position, baseline=baseline,
                                  error_node=error_node, **kw)
        ids, mask = self.encode_batch(input_ids, attention_mask)
        sinks = self._sinks(stats)
        last = _obj.bounds(mask)[1]
        with self._frozen(), ExitStack() as stack, torch.enable_grad():
            recs = {h: stack.enter_context(sp.recording(mask=mask, last_index=last, device=self.device,
                                                        stats=sinks[h], deterministic=deterministic))
                    for h, sp in self.splices.items()}
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
        infs = {h: self._recorded(h, rec, mask) for h, rec in recs.items()}
        yv = y.detach().reshape(-1)
        if yv.numel() == 1 and ids.shape[0] > 1:  # a callable objective returned one scalar
            yv = yv.expand(ids.shape[0])
        inf = next(iter(infs.values()))
        return Attribution(inf, mask, None if logits is None else logits.detach(), yv, ids, infs)

    def _sinks(self, stats) -> dict:
        """``{hook: LatentStats or None}`` from ``attribute``'s ``stats``: one sink (one SAE) or
        a ``{hook: sink}`` mapping (several; hooks left out get none)."""
        if stats is None:
            return dict.fromkeys(self.splices)
        if isinstance(stats, Mapping):
            unknown = sorted(set(stats) - set(self.splices))
            if unknown:
                raise InputError(f"stats names hooks {unknown} that have no SAE; the hooks are {self.hooks}")
            return {h: stats.get(h) for h in self.splices}
        if len(self.splices) != 1:
            raise InputError("a scorer with several SAEs takes stats={hook: LatentStats}")
        return {self.hooks[0]: stats}

    def _recorded(self, hook: str, rec, mask: torch.Tensor) -> Influence:
        """The one recorded :class:`Influence` of ``hook``, pad positions emptied."""
        done = rec.influences
        if len(rec.entries) != 1 or len(done) != 1:
            raise InputError(
                f"the hook {self.points[hook].name!r} ran {len(rec.entries)} times in one forward; "
                "expected exactly once"
            )
        inf = done[0]
        keep = mask.unsqueeze(-1) & (inf.indices >= 0)
        z = lambda t: torch.where(keep, t, torch.zeros_like(t))
        return Influence(torch.where(keep, inf.indices, torch.full_like(inf.indices, -1)),
                         z(inf.acts), z(inf.grads), z(inf.scores), inf.d_sae)

    def reduce(self, attr: Attribution, reduce: str = "mean", sign: str = "relu"):
        """Per-prompt scores from an :class:`Attribution`: ``sign`` in ``relu`` (the paper),
        ``signed``, ``abs``; ``reduce`` over positions in ``mean`` (the paper; over real
        tokens, inactive counting 0), ``sum``, ``last``. A :class:`ScoreResult`; with several
        SAEs, ``{hook: ScoreResult}``."""
        if reduce not in REDUCES:
            raise InputError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        if sign not in SIGNS:
            raise InputError(f"sign must be one of {SIGNS}, got {sign!r}")
        if self.multi:
            infs = attr.influences or {self.hooks[0]: attr.influence}
            return {h: self._reduce_one(attr, inf, reduce, sign) for h, inf in infs.items()}
        return self._reduce_one(attr, attr.influence, reduce, sign)

    def _reduce_one(self, attr: Attribution, inf: Influence, reduce: str, sign: str) -> ScoreResult:
        mask = attr.mask
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
        err = None
        if attr.error is not None:  # the error node, reduced as the latents
            e = attr.error.to(s.dtype)
            e = e.relu() if sign == "relu" else e.abs() if sign == "abs" else e
            err = (e * w).sum(-1)
            err = err / n.squeeze(-1) if reduce == "mean" else err
        out = ScoreResult()
        for b in range(B):
            li = inf.indices[b, int(last[b])]
            out.append(PromptScores(
                scores=tot[b].cpu(), active=(count[b] > 0).cpu(),
                active_last=torch.sort(li[li >= 0]).values.cpu(),
                last_acts=last_acts[b].cpu(), mean_acts=mean_acts[b].cpu(),
                objective=float(attr.objective[b]),
                error=None if err is None else float(err[b]), method=attr.method,
            ))
        return out

    def score(self, batch_or_text, objective="predicted_prob", position: int = -1, reduce: str = "mean",
              sign: str = "relu", attention_mask=None, method: str = "grad", steps: int = 16, baseline=None,
              latents=10, budget: int | None = None, **objective_kwargs):
        """GradSAE scores per prompt. A single text (or 1-D ids) gives a :class:`PromptScores`;
        a batch gives a :class:`ScoreResult` (a list of them). A scorer with several SAEs
        gives ``{hook: PromptScores}`` or ``{hook: ScoreResult}``, in the scorer's hook order,
        from one forward and one backward (``method="grad"`` only).

        ``method``: ``"grad"`` (default, the paper's first-order score), ``"ig"`` (integrated
        gradients, ``steps`` passes) or ``"exact"`` (``Y(clean) - Y(latent zeroed)`` for the
        ``latents``: K, each prompt's Top-K by the first-order score, or a list of ids; at most
        ``budget`` ablations per prompt). ``baseline``: a corrupt prompt of the same token counts
        (attribution patching with ``"grad"``, the start of the path with ``"ig"``). See
        :mod:`gradsae.model.methods`."""
        single = isinstance(batch_or_text, str) or (
            isinstance(batch_or_text, torch.Tensor) and batch_or_text.dim() == 1)
        if method == "exact":
            from .methods import score_exact

            self.require_one_sae("method='exact'")
            if baseline is not None:
                raise InputError("method='exact' zero-ablates latents; baseline= works with method='grad' or 'ig'")
            res = score_exact(self, batch_or_text, attention_mask, objective, position, latents=latents,
                              budget=budget, reduce=reduce, sign=sign, **objective_kwargs)
            return res[0] if single else res
        attr = self.attribute(batch_or_text, attention_mask, objective, position, method=method, steps=steps,
                              baseline=baseline, **objective_kwargs)
        res = self.reduce(attr, reduce, sign)
        if isinstance(res, dict):
            return {h: (r[0] if single else r) for h, r in res.items()}
        return res[0] if single else res

    def require_one_sae(self, what: str) -> None:
        """One-line :class:`InputError` unless this scorer has one SAE (not a transcoder): what the
        methods other than the first-order score serve; ``what`` names the caller's setting."""
        if len(self.splices) > 1:
            raise InputError(f"{what} takes a scorer with one SAE; this one has {len(self.splices)} "
                             f"({', '.join(self.splices)}): build GradSAE(model, sae, hook=...) per hook")
        if self.sae.transcoder:
            raise InputError(f"{what} is not offered for transcoders (their first-order scores are: use "
                             "method='grad' without baseline=)")

    def validate(self, prompts, K: int = 10, steps: int = 16, budget: int | None = 64, objective="predicted_prob",
                 position: int = -1, batch_size: int = 16, **objective_kwargs):
        """How well the first-order score agrees with integrated gradients and exact ablation on
        ``prompts``: a :class:`~gradsae.model.validate.Validation` (correlations, sign agreement,
        Top-K overlap, per-latent table). See :func:`gradsae.model.validate.validate`."""
        from .validate import validate

        self.require_one_sae("validate()")
        return validate(self, prompts, K=K, steps=steps, budget=budget, objective=objective, position=position,
                        batch_size=batch_size, **objective_kwargs)

    # ------------------------------------------------------------------ interventions
    @contextmanager
    def intervene(self, zero=(), set=None, add=None, positions: str = "all"):
        """Splice the SAE with latent edits for every forward inside the block (see
        :mod:`gradsae.model.interventions`): ``zero`` latents, ``set`` {latent: value},
        ``add`` {latent: alpha} (``alpha * W_dec[latent]``), at ``"all"`` positions or the
        ``"last"``. Nested blocks combine.

        With several SAEs each edit names its hook: ``zero={hook: latents}``, ``set={hook:
        {latent: value}}``, ``add={hook: {latent: alpha}}``; every SAE is in place during the
        block (spliced, or a no-op in error mode where not edited) and the block yields
        ``{hook: Intervention}`` of the edited hooks."""
        edits = self._edits(zero, set, add)
        ivs = {h: Intervention(e["zero"], e["set"], e["add"], positions).validate(self.saes[h].d_sae)
               for h, e in edits.items()}
        with ExitStack() as stack:
            for h, sp in self.splices.items():
                stack.enter_context(sp.editing(ivs[h]) if h in ivs else sp)
            yield ivs if self.multi else ivs[self.hooks[0]]

    def _edits(self, zero, set, add) -> dict:
        """``{hook: {"zero": [...], "set": {...}, "add": {...}}}`` from :meth:`intervene`'s
        arguments (per-hook mappings, or plain edits of a single SAE)."""
        def per_hook(v) -> bool:
            return isinstance(v, Mapping) and bool(v) and all(isinstance(k, str) for k in v)

        def latents(v):
            return [int(j) for j in (v.tolist() if isinstance(v, torch.Tensor) else v)]

        args = {"zero": zero, "set": set, "add": add}
        out: dict = {}
        for name, v in args.items():
            if v is None or (not isinstance(v, Mapping) and name != "zero"):
                continue
            if per_hook(v):
                unknown = sorted(h for h in v if h not in self.splices)
                if unknown:
                    raise InputError(f"{name}= names hooks {unknown} that have no SAE; the hooks are {self.hooks}")
                for h, e in v.items():
                    out.setdefault(h, {"zero": [], "set": {}, "add": {}})[name] = (
                        latents(e) if name == "zero" else dict(e or {}))
                continue
            empty = (len(v) == 0) if not isinstance(v, torch.Tensor) else v.numel() == 0
            if empty:
                continue
            if self.multi:
                raise InputError(
                    f"a scorer with several SAEs takes {name}={{hook: ...}}; the hooks are {self.hooks}")
            out.setdefault(self.hooks[0], {"zero": [], "set": {}, "add": {}})[name] = (
                latents(v) if name == "zero" else dict(v))
        if not self.multi:
            out.setdefault(self.hooks[0], {"zero": [], "set": {}, "add": {}})
        return out

    @contextmanager
    def spliced(self):
        """Splice the SAE (every SAE of the scorer, no edits) for every forward inside the block."""
        with ExitStack() as stack:
            for sp in self.splices.values():
                stack.enter_context(sp)
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
