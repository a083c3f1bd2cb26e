"""TransformerLens ``HookedTransformer`` models in :class:`gradsae.GradSAE`.

A HookedTransformer already has a module at every hook name (``blocks.L.hook_resid_post`` is
a ``HookPoint``), so the SAE is spliced exactly where TransformerLens (and SAELens) put it.
What differs from a transformers causal LM is only the call: ``model(tokens,
attention_mask=...)`` returns the logits tensor. :class:`HookedTransformerLM` gives the
HookedTransformer the transformers call convention (``input_ids=``, ``attention_mask=``,
output with ``.logits``) and resolves hook names on the wrapped model, so everything built on
that convention (scoring, corpus runs, generation without a KV cache, interventions) works
unchanged. :func:`adapt_model` wraps a HookedTransformer (or a subclass such as SAELens'
``HookedSAETransformer``) or a TransformerLens 3 ``TransformerBridge`` (same hook names and
call) and returns any other model as it is.

Positions: TransformerLens derives each row's positions from the attention mask (counted from
its first real token), which is the convention GradSAE uses for padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..errors import InputError


_TL_MODELS = ("HookedTransformer", "TransformerBridge")


def is_hooked_transformer(model) -> bool:
    """True for a TransformerLens ``HookedTransformer`` or ``TransformerBridge`` (or a subclass
    of either), detected by class without importing transformer_lens."""
    return any(
        c.__name__ in _TL_MODELS and (c.__module__ or "").startswith("transformer_lens")
        for c in type(model).__mro__
    )


@dataclass
class LMOutput:
    """What a transformers causal LM returns, as far as gradsae reads it."""

    logits: torch.Tensor
    past_key_values: None = None


class HookedTransformerLM(torch.nn.Module):
    """A HookedTransformer with the call convention of a transformers causal LM.

    Args:
        hooked: the ``HookedTransformer``; it is registered as the submodule ``hooked``, and
            hook names and module paths resolve on it (``get_submodule("blocks.2.hook_resid_post")``).

    ``config`` carries ``hidden_size`` (``d_model``), ``num_hidden_layers``, ``vocab_size``,
    ``n_ctx`` and ``model_type="hooked_transformer"``; ``tokenizer`` is the HookedTransformer's.
    """

    def __init__(self, hooked):
        super().__init__()
        self.hooked = hooked
        cfg = hooked.cfg
        self.config = SimpleNamespace(
            hidden_size=int(cfg.d_model), num_hidden_layers=int(cfg.n_layers),
            vocab_size=int(cfg.d_vocab), n_ctx=int(cfg.n_ctx), model_type="hooked_transformer",
        )
        self.tokenizer = getattr(hooked, "tokenizer", None)

    def get_submodule(self, target: str) -> torch.nn.Module:
        """Resolve ``target`` on the HookedTransformer first (its hook names), then on this
        wrapper (``hooked.blocks.0``)."""
        try:
            m = self.hooked.get_submodule(target)
        except AttributeError:
            return super().get_submodule(target)
        if any((c.__module__ or "").startswith("sae_lens") for c in type(m).__mro__):
            raise InputError(
                f"an SAELens SAE is attached at {target!r} (HookedSAETransformer.add_sae); gradsae "
                "splices the SAE itself: call model.reset_saes() and pass that SAE to GradSAE"
            )
        return m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                **kwargs) -> LMOutput:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``.

        ``position_ids`` may be given only as the mask implies them (each row counted from its
        first real token), which is how TransformerLens positions padded rows; KV caches are
        not supported (``use_cache`` is ignored and no cache is returned).
        """
        if past_key_values is not None:
            raise InputError("a HookedTransformer wrapped by gradsae does not take past_key_values")
        if kwargs:
            raise InputError(f"unsupported arguments for a HookedTransformer: {sorted(kwargs)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is not None:
            implied = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            real = attention_mask.bool()
            if not torch.equal(position_ids.to(implied.device)[real], implied[real]):
                raise InputError(
                    "a HookedTransformer positions each row from its first real token; other "
                    "position_ids cannot be passed to it"
                )
        logits = self.hooked(input_ids, return_type="logits", attention_mask=attention_mask.long())
        return LMOutput(logits=logits)


def adapt_model(model, tokenizer=None):
    """``(model, tokenizer)`` ready for :class:`gradsae.GradSAE`: a HookedTransformer is wrapped
    in :class:`HookedTransformerLM` (its own tokenizer used when none is given); any other model
    is returned unchanged."""
    if isinstance(model, HookedTransformerLM):
        return model, tokenizer if tokenizer is not None else model.tokenizer
    if is_hooked_transformer(model):
        wrapped = HookedTransformerLM(model)
        return wrapped, tokenizer if tokenizer is not None else wrapped.tokenizer
    return model, tokenizer
