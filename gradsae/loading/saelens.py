"""SAELens checkpoints: ``cfg.json`` + ``sae_weights.safetensors``; reading and writing.

Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
``threshold [d_sae]`` for JumpReLU (``log_threshold`` in some training checkpoints; a scalar
``topk_threshold`` in BatchTopK training checkpoints).

Configs of SAELens >= 6 carry ``architecture`` (``standard``, ``topk``, ``jumprelu``, and the
training-only ``batchtopk``), ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations``, ``k`` and ``rescale_acts_by_decoder_norm`` (TopK), and a ``metadata``
object with ``hook_name``, ``model_name``, ... Older configs keep those at the top level
(``hook_name`` or ``hook_point``, ``hook_layer`` or ``hook_point_layer``), name the activation
in ``activation_fn_str`` / ``activation_fn`` (``relu``, or ``topk`` with
``activation_fn_kwargs: {"k": ...}``), may write ``normalize_activations`` as a boolean, and
may store a per-latent ``scaling_factor`` applied to the latents before decoding
(``finetuning_scaling_factor``); gradsae folds it into ``W_dec``, which leaves encode and decode
unchanged.

``normalize_activations="expected_average_only_in"`` scales inputs by one dataset constant
during training. SAELens folds that constant into the weights at the end of training (the final
config then says ``"none"``), and at inference an unfolded SAE applies no scaling at all. gradsae
does the same: when an ``activation_scaler.json`` with a ``scaling_factor`` sits beside the
weights (an intermediate training checkpoint) the factor is folded into the weights
(``W_enc * s``, ``W_dec / s``, ``b_dec / s``, so raw inputs give the trained reconstruction);
otherwise the setting is recorded in the metadata and the weights are used as they are.

Attention-output SAEs (``hook_z``) work on the heads flattened into one vector of
``d_in = n_heads * d_head``; ``metadata["reshape_activations"] == "hook_z"`` tells the caller to
flatten. Gated SAEs (``b_gate``, ``b_mag``, ``r_mag``) load as their exact JumpReLU form (see
:func:`gradsae.loading.objects.gated_as_jumprelu`). Transcoders (``transcoder``,
``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``: ``d_out``, and
``W_skip [d_out, d_in]`` for the skip forms) load as gradsae transcoders: the input is read as it
is (SAELens' transcoders never subtract ``b_dec``), the output hook is ``hook_name_out`` (in the
metadata or at the top level of the config; by default the ``hook_mlp_out`` of the input hook's
layer). Other architectures are refused with an error that names them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, SAEFormatError
from ..fsutil import atomic_write, atomic_write_text, make_temp_dir, normal_mode
from ..sae import SAE
from .readers import (
    build_sae,
    check_config_dims,
    check_finite,
    check_shape,
    default_hook_out,
    fail,
    get_tensor,
    hook_layer_from_name,
    parse_dtype,
    read_json,
    read_safetensors,
)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"

TRANSCODERS = {  # architecture -> (activation, has W_skip)
    "transcoder": ("standard", False),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
SUPPORTED = ("standard", "topk", "jumprelu", "batchtopk", "gated", *TRANSCODERS)
_GATED_TENSORS = ("b_gate", "b_mag", "r_mag")  # a gated SAE, evaluated in its exact JumpReLU form
# tensors of architectures gradsae cannot evaluate: their presence must not be ignored
_FOREIGN_TENSORS = ("W_skip", "b_gate", "b_mag", "r_mag", "W_dec_out", "b_dec_out")
# config keys that the maths consumes (everything else is kept as metadata)
_CONSUMED = {
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
    "normalize_activations", "k", "rescale_acts_by_decoder_norm", "activation_fn",
    "activation_fn_str", "activation_fn_kwargs", "metadata", "hook_name", "hook_point",
    "model_name", "hook_layer", "hook_point_layer", "finetuning_scaling_factor", "d_out", "hook_name_out",
}
# the version written into saved configs' metadata: the SAELens config layout (>= 6.0) the
# file follows, which SAELens reads to decide how to parse the config
LAYOUT_VERSION = "6.0.0"


def find_files(path: Path) -> tuple[Path, Path]:
    """``(cfg.json, sae_weights.safetensors)`` for a directory or either file in it."""
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() and path.suffix == ".safetensors" else folder / WEIGHTS_FILENAME
    return folder / CFG_FILENAME, weights


def _normalization(value: Any, cfg_file: Path) -> str:
    if value is None or value is False or value == "none":
        return "none"
    if value is True:  # pre-6.0 boolean: the April-update dataset scaling
        return "expected_average_only_in"
    if value in ("constant_norm_rescale", "layer_norm", "expected_average_only_in"):
        return value
    raise fail(cfg_file, f"unknown normalize_activations {value!r}")


def _architecture(cfg: dict, cfg_file: Path) -> tuple[str, int | None]:
    """``(architecture, k)``, reading pre-6.0 activation keys where needed."""
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture") or "standard"
    k = cfg.get("k")
    if arch == "standard" and act not in (None, "relu"):
        if act == "topk":
            arch, k = "topk", kwargs.get("k", k)
        else:
            raise fail(cfg_file, f"unsupported activation function {act!r} (gradsae supports relu and topk)")
    if arch == "topk" and k is None:
        k = kwargs.get("k")
    if arch not in SUPPORTED:
        raise fail(
            cfg_file,
            f"unsupported SAE architecture {arch!r}; gradsae loads {', '.join(SUPPORTED)}",
        )
    if arch == "topk":
        if k is None:
            raise fail(cfg_file, "a topk SAE config needs k")
        if not float(k).is_integer() or int(k) < 1:
            raise fail(cfg_file, f"k must be a positive integer, got {k!r}")
        k = int(k)
    return arch, k


def load_saelens(path: Path, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Load an SAELens checkpoint directory (or its ``sae_weights.safetensors`` / ``cfg.json``)."""
    cfg_file, weights_file = find_files(path)
    cfg = read_json(cfg_file, "SAELens config")
    arch, k = _architecture(cfg, cfg_file)
    tensors = read_safetensors(weights_file)
    transcoder = arch in TRANSCODERS
    W_skip = None
    if transcoder:
        arch_tc = arch
        arch, with_skip = TRANSCODERS[arch_tc]
        if with_skip:
            W_skip = get_tensor(tensors, "W_skip", weights_file)
        tensors = {n: t for n, t in tensors.items() if n != "W_skip"}
    foreign = [n for n in _FOREIGN_TENSORS if n in tensors and not (arch == "gated" and n in _GATED_TENSORS)]
    if foreign:
        raise fail(weights_file, f"holds {foreign}, tensors of an architecture gradsae does not support")

    W_enc = get_tensor(tensors, "W_enc", weights_file)
    W_dec = get_tensor(tensors, "W_dec", weights_file)
    b_dec = get_tensor(tensors, "b_dec", weights_file)
    b_enc = get_tensor(tensors, "b_mag" if arch == "gated" else "b_enc", weights_file)
    if W_enc.dim() != 2:
        raise fail(weights_file, f"tensor 'W_enc' has shape {list(W_enc.shape)}, expected [d_in, d_sae]")
    d_in, d_sae = W_enc.shape
    check_config_dims(weights_file, cfg_file, d_in, d_sae, cfg.get("d_in"), cfg.get("d_sae"))
    if transcoder:
        d_out = W_dec.shape[-1] if W_dec.dim() == 2 else None
        if cfg.get("d_out") not in (None, d_out):
            raise fail(weights_file, f"W_dec has d_out={d_out} but {cfg_file.name} says d_out={cfg.get('d_out')}")
        if d_out != d_in:
            raise fail(weights_file, f"a transcoder from d_in={d_in} to d_out={d_out}; gradsae's transcoders have "
                                     "d_out == d_in (an MLP's input and output)")
        if W_skip is not None:
            check_shape(W_skip, (d_in, d_in), "W_skip", weights_file, "[d_out, d_in]")
            check_finite({"W_skip": W_skip}, weights_file)

    threshold = None
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                  "gated": "jumprelu"}[arch]
    if arch == "gated":
        from .objects import gated_as_jumprelu

        gate = [get_tensor(tensors, n, weights_file) for n in ("b_gate", "r_mag", "b_mag")]
        W_enc, b_enc, threshold = gated_as_jumprelu(W_enc, *gate)
    if arch == "jumprelu":
        if "threshold" in tensors:
            threshold = get_tensor(tensors, "threshold", weights_file)
        elif "log_threshold" in tensors:
            threshold = get_tensor(tensors, "log_threshold", weights_file).exp()
        else:
            raise fail(weights_file, "missing tensor 'threshold' (or 'log_threshold') of a jumprelu SAE")
    elif arch == "batchtopk":
        if "threshold" in tensors:
            threshold = get_tensor(tensors, "threshold", weights_file)
        elif "topk_threshold" in tensors:
            threshold = get_tensor(tensors, "topk_threshold", weights_file).to(W_enc.dtype)
        else:
            raise fail(
                weights_file,
                "missing tensor 'threshold' (or 'topk_threshold'): a batchtopk SAE is evaluated per "
                "token with its learned threshold",
            )

    # pre-6.0 per-latent scaling of the latents before decoding: fold into W_dec
    if "scaling_factor" in tensors:
        s = get_tensor(tensors, "scaling_factor", weights_file)
        if tuple(s.shape) not in ((d_sae,), ()):
            raise fail(weights_file, f"tensor 'scaling_factor' has shape {list(s.shape)}, expected [{d_sae}]")
        if not torch.all(s == 1):
            W_dec = W_dec * s.to(W_dec.dtype).reshape(-1, 1)

    normalize = _normalization(cfg.get("normalize_activations"), cfg_file)
    if transcoder and normalize not in ("none", "expected_average_only_in"):
        raise fail(cfg_file, f"a transcoder with normalize_activations={normalize!r}; gradsae's transcoders read "
                             "their input as it is")
    extra_meta: dict[str, Any] = {}
    if normalize == "expected_average_only_in":
        extra_meta["normalize_activations"] = normalize
        scaler = weights_file.parent / SCALER_FILENAME
        factor = read_json(scaler, "activation scaler").get("scaling_factor") if scaler.is_file() else None
        if factor is not None:
            try:
                s = float(factor)
            except (TypeError, ValueError):
                raise fail(scaler, f"scaling_factor {factor!r} is not a number") from None
            if not math.isfinite(s) or s <= 0:
                raise fail(scaler, f"scaling_factor {factor!r} must be a positive finite number")
            W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
            extra_meta["folded_scaling_factor"] = s
        normalize = "none"

    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    model_name = meta.get("model_name", cfg.get("model_name"))
    hook_layer = meta.get("hook_layer", cfg.get("hook_layer", cfg.get("hook_point_layer")))
    try:
        hook_layer = int(hook_layer) if hook_layer is not None else None
    except (TypeError, ValueError):
        raise fail(cfg_file, f"hook_layer {hook_layer!r} is not an integer") from None
    if hook_layer is None:
        hook_layer = hook_layer_from_name(hook_name)
    extra = {kk: v for kk, v in cfg.items() if kk not in _CONSUMED}
    extra.update({kk: v for kk, v in meta.items() if kk not in ("hook_name", "model_name", "hook_layer")})
    extra.update(extra_meta)
    if str(hook_name or "").endswith("hook_z"):
        # attention-output SAEs read [..., n_heads, d_head] flattened to d_in = n_heads * d_head
        extra.setdefault("reshape_activations", "hook_z")
    extra["format"] = "saelens"
    extra["architecture"] = arch_tc if transcoder else arch
    transcoder_kw: dict[str, Any] = {}
    if transcoder:
        out = meta.get("hook_name_out", cfg.get("hook_name_out")) or default_hook_out(hook_name)
        transcoder_kw = {"transcoder": True, "hook_name_out": out, "W_skip": W_skip}

    stored = cfg.get("dtype")
    if dtype is None and stored is not None:
        try:
            dtype = parse_dtype(stored, where=str(cfg_file))
        except SAEFormatError:
            dtype = None  # an unusual dtype string: keep the stored tensors' dtype

    return build_sae(
        weights_file,
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
        device=device, dtype=dtype,
        activation=activation, k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        normalize_activations=normalize,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and arch in ("topk", "batchtopk"),
        hook_name=hook_name, model_name=model_name,
        hook_layer=hook_layer,
        metadata=extra,
        **transcoder_kw,
    )



# ---------------------------------------------------------------------------------- saving
def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def saelens_state(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``(cfg, tensors)`` SAELens (>= 6) would read back as an SAE with the same
    encode/decode. Decoder-norm rescaling, which SAELens only has for TopK, is folded into the
    weights for the other activations (an exact reparametrisation)."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    rescale = sae.rescale_acts_by_decoder_norm
    if rescale and sae.activation != "topk":
        n = sae.decoder_norm().to(W_enc.dtype)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n.unsqueeze(-1)
        rescale = False
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.activation]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if sae.activation == "jumprelu":
        tensors["threshold"] = sae.threshold
    if sae.transcoder:
        if arch == "topk" or sae.apply_b_dec_to_input:
            raise InputError(
                "SAELens has no transcoder that " + ("keeps the top k latents" if arch == "topk" else
                                                     "subtracts b_dec from its input") + "; this transcoder cannot be "
                "saved in SAELens layout"
            )
        skip = sae.W_skip is not None
        arch = {"standard": "skip_transcoder" if skip else "transcoder",
                "jumprelu": "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"}[arch]
        if skip:
            tensors["W_skip"] = sae.W_skip
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    reserved = {"format", "architecture", "folded_scaling_factor", "reshape_activations", "hub"}
    metadata = _jsonable({k: v for k, v in sae.meta.extra.items() if k not in reserved and k not in _CONSUMED})
    metadata.update(
        hook_name=sae.meta.hook_name, model_name=sae.meta.model_name, hook_layer=sae.meta.hook_layer,
        sae_lens_version=LAYOUT_VERSION, sae_lens_training_version=LAYOUT_VERSION,
    )
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": sae.meta.extra.get("reshape_activations", "none"),
        "metadata": metadata,
    }
    if arch == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = rescale
    if sae.transcoder:
        cfg["d_out"] = sae.W_dec.shape[-1]
        metadata["hook_name_out"] = sae.meta.hook_name_out
    return cfg, tensors


def save_saelens(sae: SAE, path) -> None:
    """Write ``sae`` as an SAELens (>= 6) checkpoint directory: ``cfg.json`` and
    ``sae_weights.safetensors``.

    Nothing half-written is left behind: a new directory is built under a temporary name beside
    ``path`` and renamed into place; into an existing directory each file is written to a
    temporary name there and atomically replaces its predecessor (weights first, then config).
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise InputError(f"save_saelens needs a gradsae SAE, got {type(sae).__name__}")
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory; SAE.save writes a directory")
    cfg, tensors = saelens_state(sae)
    cfg_text = json.dumps(cfg, indent=2)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)

    if not target.exists():
        tmp = make_temp_dir(parent, target.name)
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILENAME))
            (tmp / CFG_FILENAME).write_text(cfg_text, encoding="utf-8")
            for f in (WEIGHTS_FILENAME, CFG_FILENAME):  # safetensors writes owner-only files
                os.chmod(tmp / f, normal_mode())
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return

    atomic_write(target / WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(target / CFG_FILENAME, cfg_text)
