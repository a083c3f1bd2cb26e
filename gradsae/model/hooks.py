"""Hook points on plain HF transformers models, by TransformerLens-style name or module path.

    point = resolve_hook(model, "blocks.3.hook_resid_post")
    handle = point.attach(fn)      # fn(tensor [B, T, d]) -> tensor: replaces what flows there

Names understood, for every model whose decoder layers can be found (GPT-2, GPT-NeoX/Pythia,
Llama, Mistral, Qwen2/3, Gemma-2/3 and anything laid out like them):

- ``blocks.{L}.hook_resid_post``: the output of decoder layer L;
- ``blocks.{L}.hook_resid_pre``: the input of decoder layer L;
- ``blocks.{L}.hook_attn_out`` / ``hook_mlp_out``: what the attention / MLP sub-block adds to the
  residual stream (for Gemma-2/3, after the post-attention / post-feedforward norm, as
  TransformerLens defines it);
- ``blocks.{L}.attn.hook_z``: the attention heads' outputs before the output projection, heads
  flattened into one vector of ``n_heads * d_head`` (the input of ``o_proj`` / ``c_proj`` /
  ``dense``), which is how attention-output SAEs are trained;
- ``blocks.{L}.ln2.hook_normalized`` (alias ``blocks.{L}.mlp.hook_in``): what the MLP module
  reads, the output of the pre-MLP norm with its weight (``ln_2``, ``post_attention_layernorm``,
  Gemma's ``pre_feedforward_layernorm``): a transcoder's input, as Gemma Scope's transcoders read
  it. (On a TransformerLens model the name is TransformerLens' own hook point.)
- ``blocks.{L}.hook_mlp_in``: the residual stream entering the pre-MLP norm (TransformerLens'
  meaning: the norm's input);
- a module path of the model (``model.layers.3.mlp``), or one relative to its base model, as
  sparsify names its hookpoints (``layers.3``, ``h.3``): the module's output. This also resolves
  hook modules named like ``blocks.9.hook_resid_post`` on models that have them.

Attaching is generic: :func:`attach_replacement` puts an output- (or input-) replacing hook on
any module; a module that returns a tuple has its first element replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InputError

TL_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z",
            "ln2.hook_normalized", "mlp.hook_in", "hook_mlp_in")
MLP_INPUTS = ("ln2.hook_normalized", "mlp.hook_in", "hook_mlp_in")  # the kinds a transcoder reads
_TL_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(k.replace(".", r"\.") for k in TL_KINDS) + r")$")

# Decoder-layer containers, tried in order (relative to the top-level model).
_LAYER_PATHS = (
    "model.layers",                 # Llama, Mistral, Qwen2/3, Gemma-2/3 (ForCausalLM)
    "model.language_model.layers",  # Gemma-3 ForConditionalGeneration
    "language_model.model.layers",
    "transformer.h",                # GPT-2
    "gpt_neox.layers",              # GPT-NeoX / Pythia
    "layers",                       # base models
    "h",
)
# Sub-modules whose output is hook_attn_out / hook_mlp_out, per model_type; the first that
# exists in the layer is used.
_ATTN_OUT = {
    "gemma2": ("post_attention_layernorm",),
    "gemma3": ("post_attention_layernorm",),
    "gemma3_text": ("post_attention_layernorm",),
}
_MLP_OUT = {
    "gemma2": ("post_feedforward_layernorm",),
    "gemma3": ("post_feedforward_layernorm",),
    "gemma3_text": ("post_feedforward_layernorm",),
}
# the norm in front of the MLP, whose input is hook_mlp_in
_MLP_NORM = {
    "gemma2": ("pre_feedforward_layernorm",),
    "gemma3": ("pre_feedforward_layernorm",),
    "gemma3_text": ("pre_feedforward_layernorm",),
}
_MLP_NORM_DEFAULT = ("ln_2", "post_attention_layernorm", "ffn_norm", "ln2")
_ATTN_DEFAULT = ("self_attn", "attn", "attention", "self_attention")
_ATTN_PROJ = ("o_proj", "c_proj", "dense", "out_proj")  # the attention's output projection
_MLP_DEFAULT = ("mlp", "feed_forward", "ffn")


@dataclass
class HookPoint:
    """A resolved hook: ``module`` and whether its ``output`` or its first ``input`` is replaced.

    ``d_model`` is the width expected there when the model's config says it (else None: it is
    checked on the first forward).
    """

    name: str
    module: torch.nn.Module
    module_path: str
    kind: str = "output"
    d_model: int | None = None

    def attach(self, fn):
        """Replace what flows through this point by ``fn(tensor)``; returns a removable handle."""
        return attach_replacement(self.module, fn, self.kind)


def _replace_first(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (fn(value[0]),) + tuple(value[1:])
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [fn(value[0])] + list(value[1:])
    raise InputError(
        f"cannot hook a module whose output is {type(value).__name__}; expected a tensor or a "
        "tuple whose first element is the hidden state"
    )


def attach_replacement(module: torch.nn.Module, fn, kind: str = "output"):
    """Attach a hook to ``module`` that replaces its output (``kind="output"``) or the hidden
    state it receives (``kind="input"``: first positional argument, or ``hidden_states=``) by
    ``fn(tensor)``. Returns the ``torch.utils.hooks.RemovableHandle``."""
    if kind == "output":
        return module.register_forward_hook(lambda m, args, out: _replace_first(out, fn))
    if kind == "input":
        def pre(m, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            if "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = fn(kwargs["hidden_states"])
                return args, kwargs
            raise InputError(f"{type(m).__name__} received no hidden state to replace")

        return module.register_forward_pre_hook(pre, with_kwargs=True)
    raise InputError(f"kind must be 'output' or 'input', got {kind!r}")


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return getattr(cfg, "text_config", None) or cfg


def model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def hidden_size(model) -> int | None:
    cfg = _config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(v, int):
            return v
    return None


def _get(model, path):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_layers(model) -> tuple[str, torch.nn.ModuleList] | None:
    """The path and ``ModuleList`` of the model's decoder layers, or None."""
    cfg = _config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for path in _LAYER_PATHS:
        m = _get(model, path)
        if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n):
            return path, m
    if n is not None:  # any ModuleList of the right length
        for path, m in model.named_modules():
            if isinstance(m, torch.nn.ModuleList) and len(m) == n:
                return path, m
    return None


def _sub(layer, names):
    for nm in names:
        if hasattr(layer, nm) and isinstance(getattr(layer, nm), torch.nn.Module):
            return nm
    return None


def valid_names(model) -> list[str]:
    """The TransformerLens-style names this model resolves."""
    found = find_layers(model)
    if found is None:
        return []
    _, layers = found
    out = []
    for i, layer in enumerate(layers):
        for kind in TL_KINDS:
            if kind == "hook_attn_out" and _attn_name(model, layer) is None:
                continue
            if kind == "hook_mlp_out" and _mlp_name(model, layer) is None:
                continue
            if kind in ("ln2.hook_normalized", "mlp.hook_in") and _sub(layer, _MLP_DEFAULT) is None:
                continue
            if kind == "hook_mlp_in" and _sub(layer, _MLP_NORM.get(model_type(model), _MLP_NORM_DEFAULT)) is None:
                continue
            if kind == "attn.hook_z" and _z_point(layer) is None:
                continue
            out.append(f"blocks.{i}.{kind}")
    return out


def _attn_name(model, layer):
    return _sub(layer, _ATTN_OUT.get(model_type(model), _ATTN_DEFAULT))


def _mlp_name(model, layer):
    return _sub(layer, _MLP_OUT.get(model_type(model), _MLP_DEFAULT))


def _z_point(layer) -> tuple[str, torch.nn.Module, int | None] | None:
    """``(path in the layer, projection module, its input width)`` of the attention's output
    projection, whose input is hook_z with the heads flattened; None if not found."""
    attn = _sub(layer, _ATTN_DEFAULT)
    proj = _sub(getattr(layer, attn), _ATTN_PROJ) if attn is not None else None
    if proj is None:
        return None
    m = getattr(getattr(layer, attn), proj)
    w = getattr(m, "weight", None)
    if isinstance(m, torch.nn.Linear):
        width = m.in_features
    elif isinstance(w, torch.Tensor) and w.dim() == 2 and type(m).__name__ == "Conv1D":  # GPT-2: [in, out]
        width = w.shape[0]
    else:
        width = None
    return f"{attn}.{proj}", m, width


def _unknown(model, name, why: str) -> InputError:
    names = valid_names(model)
    found = find_layers(model)
    if names and len(names) <= 48:
        listing = ", ".join(names)
    elif names:
        n = len(found[1])
        listing = "blocks.{L}.{" + ",".join(TL_KINDS) + "}" + f" for L in 0..{n - 1}"
    else:
        listing = "(no decoder layers found in this model)"
    example = f"{found[0]}.0" if found else "a module path from model.named_modules()"
    return InputError(
        f"unknown hook {name!r} for this {model_type(model)} model: {why}. Valid names: {listing}; "
        f"or a module path of the model such as {example!r}"
    )


def resolve_hook(model, name: str) -> HookPoint:
    """Resolve ``name`` (see the module docstring) on ``model``; raises :class:`InputError`
    listing the valid names when it does not exist."""
    if not isinstance(name, str) or not name:
        raise InputError(f"hook must be a non-empty string, got {name!r}")
    d = hidden_size(model)
    # 1. a module path of the model itself (also TransformerLens HookPoint modules)
    m = _get(model, name)
    if m is not None:
        return HookPoint(name, m, name, "output", None)
    # 2. TransformerLens-style names
    mt = _TL_RE.match(name)
    if mt:
        layer_i, kind = int(mt.group(1)), mt.group(2)
        found = find_layers(model)
        if found is None:
            raise _unknown(model, name, "its decoder layers could not be found")
        path, layers = found
        if layer_i >= len(layers):
            raise _unknown(model, name, f"layer {layer_i} does not exist (the model has {len(layers)})")
        layer = layers[layer_i]
        lp = f"{path}.{layer_i}"
        if kind == "hook_resid_post":
            return HookPoint(name, layer, lp, "output", d)
        if kind == "hook_resid_pre":
            return HookPoint(name, layer, lp, "input", d)
        if kind == "attn.hook_z":
            z = _z_point(layer)
            if z is None:
                raise _unknown(model, name, f"layer {layer_i} has no recognised attention output projection")
            return HookPoint(name, z[1], f"{lp}.{z[0]}", "input", z[2])
        if kind in MLP_INPUTS:
            names = _MLP_NORM.get(model_type(model), _MLP_NORM_DEFAULT) if kind == "hook_mlp_in" else _MLP_DEFAULT
            sub = _sub(layer, names)
            if sub is None:
                what = "MLP norm" if kind == "hook_mlp_in" else "MLP"
                raise _unknown(model, name, f"layer {layer_i} has no recognised {what}")
            return HookPoint(name, getattr(layer, sub), f"{lp}.{sub}", "input", d)
        sub = _attn_name(model, layer) if kind == "hook_attn_out" else _mlp_name(model, layer)
        if sub is None:
            raise _unknown(model, name, f"layer {layer_i} has no recognised {kind[5:-4]} sub-module")
        return HookPoint(name, getattr(layer, sub), f"{lp}.{sub}", "output", d)
    # 3. a module path relative to the base model (sparsify's hookpoints: "layers.3", "h.3.mlp")
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        m = _get(base, name)
        if m is not None:
            prefix = next((p for p, mm in model.named_modules() if mm is base), "")
            return HookPoint(name, m, f"{prefix}.{name}" if prefix else name, "output", None)
    raise _unknown(model, name, "no such name or module")


def resolve_transcoder(model, hook_in: str, hook_out: str | None = None) -> tuple[HookPoint, HookPoint]:
    """The ``(input, output)`` points of a transcoder on ``model``.

    ``hook_in``: where it reads (``blocks.L.ln2.hook_normalized`` ...); ``hook_out``: where its
    output stands (``blocks.L.hook_mlp_out``). When both name the same module (sparsify's
    transcoders: ``layers.L.mlp``), the transcoder reads that module's input and stands for its
    output. ``hook_out=None``: the ``hook_mlp_out`` of the layer of a ``blocks.L....`` name,
    else ``hook_in`` itself (a module path: that module's input and output).
    """
    if hook_out is None:
        m = re.match(r"^blocks\.(\d+)\.", str(hook_in))
        hook_out = f"blocks.{m.group(1)}.hook_mlp_out" if m else hook_in
    out = resolve_hook(model, hook_out)
    if hook_in == hook_out:
        return HookPoint(hook_in, out.module, out.module_path, "input", out.d_model), out
    return resolve_hook(model, hook_in), out
