"""Wrap live SAE objects of other libraries as gradsae ``SAE``s (``SAE.from_object``).

Supported, detected by the module the object's class comes from (the libraries are never
imported here, so this works whichever of them are installed):

- **SAELens** (``sae_lens``) ``SAE`` and ``TrainingSAE`` subclasses: ``standard``, ``topk``
  (with or without ``rescale_acts_by_decoder_norm``), ``jumprelu``, ``gated``, and the
  training-only ``batchtopk`` / ``matryoshka_batchtopk`` (evaluated in the JumpReLU form
  SAELens saves them in for inference). The input normalisation (``constant_norm_rescale``,
  ``layer_norm``) and ``apply_b_dec_to_input`` are carried over; attention-output (``hook_z``)
  SAEs read the heads flattened into ``d_in = n_heads * d_head`` and are flagged
  ``metadata["reshape_activations"] = "hook_z"``, as gradsae's SAELens loader does;
  ``expected_average_only_in`` and ``covariance_whitening`` are identities in SAELens' own
  ``encode`` (they are folded into the weights at load time), so they are identities here too.
- **SAELens transcoders**: ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder`` and
  ``JumpReLUSkipTranscoder`` (``d_out == d_in``), as gradsae transcoders (input read as it is,
  ``W_skip`` carried; the output hook is the metadata's ``hook_name_out``, else the
  ``hook_mlp_out`` of the input hook's layer).
- **EleutherAI sparsify** (``sparsify``) ``SparseCoder`` (alias ``Sae``) with the ``topk``
  activation, autoencoders and transcoders (``transcode=True``, with or without
  ``skip_connection``).
- **dictionary_learning** (``dictionary_learning``) ``AutoEncoder``, ``AutoEncoderNew``,
  ``GatedAutoEncoder``, ``JumpReluAutoEncoder``, ``AutoEncoderTopK``, ``BatchTopKSAE`` and
  ``MatryoshkaBatchTopKSAE`` (each with its ``encode``'s default arguments).

Gated SAEs fit gradsae's JumpReLU form exactly. With the shared encoder ``W``,
``gate = x'W + b_gate`` and ``mag = x'(W * exp(r_mag)) + b_mag``, the latent is
``mag * [gate > 0] * [mag > 0]``. Because ``exp(r_mag) > 0``, ``gate > 0`` holds exactly when
``mag > b_mag - exp(r_mag) * b_gate``, so the latent is a JumpReLU of ``mag`` with threshold
``b_mag - exp(r_mag) * b_gate`` (gradsae's jumprelu also requires ``mag > 0``). In floating
point the two forms can disagree only for a latent whose gate is within rounding of 0.

The result shares the library's weight tensors where no conversion is needed (transposes are
views); gated encoders and thresholds are computed once. Call ``from_object`` again after
changing the library object's weights.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..sae import SAE
from .readers import default_hook_out, hook_layer_from_name

SUPPORTED = (
    "a gradsae SAE; SAELens SAE/TrainingSAE (standard, topk, jumprelu, gated, batchtopk, "
    "matryoshka_batchtopk, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder); "
    "sparsify SparseCoder (topk, transcoders); dictionary_learning AutoEncoder, "
    "AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE, "
    "MatryoshkaBatchTopKSAE"
)


def sae_from_object(obj: Any) -> SAE:
    """A gradsae ``SAE`` whose ``encode``/``decode`` equal those of the live object ``obj``.

    Args:
        obj: a gradsae ``SAE`` (returned as is), a SAELens ``SAE``, a sparsify
            ``SparseCoder`` or a dictionary_learning dictionary (see the module docstring).

    Raises:
        InputError: ``obj`` is of an unsupported type or uses an option gradsae cannot
            express exactly; the message names the type and what is supported.
    """
    if isinstance(obj, SAE):
        return obj
    library = _library_of(obj)
    if library == "sae_lens":
        return _from_saelens(obj)
    if library == "sparsify":
        return _from_sparsify(obj)
    if library == "dictionary_learning":
        return _from_dictionary_learning(obj)
    raise InputError(
        f"cannot wrap an object of type {_type_name(obj)} as an SAE; supported: {SUPPORTED}"
    )


# ---------------------------------------------------------------------------------- helpers
def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _library_of(obj: Any) -> str | None:
    """The top-level package of the first class in ``type(obj)``'s MRO that comes from one of
    the supported libraries (so user subclasses of their classes are recognised too)."""
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in ("sae_lens", "sparsify", "dictionary_learning"):
            return root
    return None


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def _unsupported(obj: Any, why: str) -> InputError:
    return InputError(f"cannot wrap {_type_name(obj)}: {why}; supported: {SUPPORTED}")


def gated_as_jumprelu(W_enc, b_gate, r_mag, b_mag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_enc, b_enc, threshold)`` of the JumpReLU SAE equal to a gated SAE with shared encoder
    ``W_enc [d_in, d_sae]``, gate bias ``b_gate``, magnitude scale ``r_mag`` and magnitude bias
    ``b_mag`` (see the module docstring for why this is exact)."""
    scale = _t(r_mag).exp()
    return _t(W_enc) * scale, _t(b_mag), _t(b_mag) - scale * _t(b_gate)


def _gated(W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, **kw) -> SAE:
    W_mag, b_enc, threshold = gated_as_jumprelu(W_enc, b_gate, r_mag, b_mag)
    return SAE(W_mag, b_enc, _t(W_dec), _t(b_dec), activation="jumprelu", threshold=threshold, **kw)


# ----------------------------------------------------------------------------------- SAELens
_SAELENS_NORMS = {
    "none": "none",
    "constant_norm_rescale": "constant_norm_rescale",
    "layer_norm": "layer_norm",
    # identities in SAELens' own encode/decode (folded into the weights when loading)
    "expected_average_only_in": "none",
    "covariance_whitening": "none",
}


def _from_saelens(obj: Any) -> SAE:
    cfg = getattr(obj, "cfg", None)
    if cfg is None or not hasattr(cfg, "architecture"):
        raise _unsupported(obj, "a SAELens object without a cfg.architecture() is not an SAE")
    arch = cfg.architecture()
    reshape = getattr(cfg, "reshape_activations", "none") or "none"
    if reshape not in ("none", "hook_z"):
        raise _unsupported(obj, f"reshape_activations={reshape!r} is unknown")
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm not in _SAELENS_NORMS:
        raise _unsupported(obj, f"normalize_activations={norm!r} is unknown")
    meta = getattr(cfg, "metadata", None)

    def metaget(key):
        if meta is None:
            return None
        return meta.get(key) if hasattr(meta, "get") else getattr(meta, key, None)

    extra = {"library": "sae_lens", "architecture": arch, "class": type(obj).__name__}
    if reshape == "hook_z" or str(metaget("hook_name") or "").endswith("hook_z"):
        # as gradsae's SAELens loader: the SAE reads the heads flattened into d_in
        extra["reshape_activations"] = "hook_z"
    if norm != _SAELENS_NORMS[norm]:
        extra["normalize_activations"] = norm
    for key in ("hook_head_index", "prepend_bos", "context_size", "dataset_path"):
        val = metaget(key)
        if val is not None:
            extra[key] = val
    hook_name = metaget("hook_name")
    kw = dict(
        apply_b_dec_to_input=bool(getattr(cfg, "apply_b_dec_to_input", True)),
        normalize_activations=_SAELENS_NORMS[norm],
        hook_name=hook_name,
        model_name=metaget("model_name"),
        hook_layer=layer if (layer := metaget("hook_layer")) is not None else hook_layer_from_name(hook_name),
        metadata=extra,
    )
    W_enc, W_dec, b_dec = obj.W_enc, obj.W_dec, obj.b_dec

    if arch in _SAELENS_TRANSCODERS:
        return _saelens_transcoder(obj, arch, kw, metaget)
    if arch == "standard":
        return SAE(_t(W_enc), _t(obj.b_enc), _t(W_dec), _t(b_dec), activation="relu", **kw)
    if arch == "topk":
        return SAE(
            _t(W_enc), _t(obj.b_enc), _t(W_dec), _t(b_dec), activation="topk", k=int(cfg.k),
            rescale_acts_by_decoder_norm=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
            **kw,
        )
    if arch == "jumprelu":
        return SAE(
            _t(W_enc), _t(obj.b_enc), _t(W_dec), _t(b_dec), activation="jumprelu",
            threshold=_t(obj.threshold), **kw,
        )
    if arch == "gated":
        return _gated(W_enc, obj.b_gate, obj.r_mag, obj.b_mag, W_dec, b_dec, **kw)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        # Batch-level top-k is a training device; SAELens saves these SAEs for inference as
        # JumpReLU SAEs with the learned global threshold (decoder norms folded in when the
        # SAE ranks by rescaled activations), which is what this reproduces.
        thr = getattr(obj, "topk_threshold", None)
        if thr is None:
            raise _unsupported(obj, f"a {arch} SAE without its learned topk_threshold")
        extra["inference_form"] = "jumprelu with the learned topk_threshold"
        return SAE(
            _t(W_enc), _t(obj.b_enc), _t(W_dec), _t(b_dec), activation="jumprelu",
            threshold=torch.as_tensor(thr).detach().to(device=W_enc.device, dtype=W_enc.dtype),
            rescale_acts_by_decoder_norm=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
            **kw,
        )
    raise _unsupported(
        obj,
        f"SAELens architecture {arch!r} has no exact gradsae form (abstopk keeps negative "
        "activations, temporal / matching-pursuit SAEs and cross-layer transcoders are not "
        "encoder-decoders of one hook or one MLP)",
    )


_SAELENS_TRANSCODERS = {"transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu",
                        "jumprelu_skip_transcoder": "jumprelu"}


def _saelens_transcoder(obj: Any, arch: str, kw: dict, metaget) -> SAE:
    d_in, d_out = obj.W_enc.shape[0], obj.W_dec.shape[-1]
    if d_out != d_in:
        raise _unsupported(obj, f"a transcoder from d_in={d_in} to d_out={d_out} (gradsae's transcoders have "
                                "d_out == d_in)")
    if kw["normalize_activations"] != "none":
        raise _unsupported(obj, f"a transcoder with normalize_activations={kw['normalize_activations']!r}")
    kw = dict(kw, apply_b_dec_to_input=False)  # SAELens' transcoders never subtract b_dec
    act = _SAELENS_TRANSCODERS[arch]
    skip = getattr(obj, "W_skip", None)
    return SAE(
        _t(obj.W_enc), _t(obj.b_enc), _t(obj.W_dec), _t(obj.b_dec), activation=act,
        threshold=_t(obj.threshold) if act == "jumprelu" else None, transcoder=True,
        W_skip=None if skip is None else _t(skip),
        hook_name_out=metaget("hook_name_out") or default_hook_out(kw["hook_name"]), **kw,
    )


# ---------------------------------------------------------------------------------- sparsify
def _from_sparsify(obj: Any) -> SAE:
    cfg = getattr(obj, "cfg", None)
    if cfg is None or not hasattr(obj, "encoder"):
        raise _unsupported(obj, "only sparsify SparseCoder objects are SAEs")
    activation = getattr(cfg, "activation", "topk")
    if activation != "topk":
        raise _unsupported(obj, f"sparsify activation {activation!r} (only 'topk' is supported)")
    transcode = bool(getattr(cfg, "transcode", False))
    skip = getattr(obj, "W_skip", None)
    if skip is not None and not transcode:
        raise _unsupported(obj, "a sparsify skip connection on an autoencoder adds x @ W_skip to the decode")
    if getattr(obj, "W_dec", None) is None:
        raise _unsupported(obj, "this SparseCoder was built without a decoder (W_dec is None)")
    # encoder is nn.Linear(d_in, num_latents): weight [num_latents, d_in]; W_dec [num_latents, d_in]
    return SAE(
        _t(obj.encoder.weight).T, _t(obj.encoder.bias), _t(obj.W_dec), _t(obj.b_dec),
        activation="topk", k=int(cfg.k), apply_b_dec_to_input=not transcode,
        metadata={"library": "sparsify", "class": type(obj).__name__,
                  "multi_topk": bool(getattr(cfg, "multi_topk", False))},
        transcoder=transcode, W_skip=None if skip is None else _t(skip),
    )


# ----------------------------------------------------------------------- dictionary_learning
def _from_dictionary_learning(obj: Any) -> SAE:
    names = _class_names(obj)
    extra = {"library": "dictionary_learning", "class": type(obj).__name__}

    def linear_dec():  # nn.Linear(dict_size, activation_dim): weight [d_in, d_sae]
        return _t(obj.decoder.weight).T

    if "GatedAutoEncoder" in names:
        return _gated(
            _t(obj.encoder.weight).T, obj.gate_bias, obj.r_mag, obj.mag_bias, linear_dec(),
            obj.decoder_bias, apply_b_dec_to_input=True, metadata=extra,
        )
    if "JumpReluAutoEncoder" in names:
        return SAE(
            _t(obj.W_enc), _t(obj.b_enc), _t(obj.W_dec), _t(obj.b_dec), activation="jumprelu",
            threshold=_t(obj.threshold),
            apply_b_dec_to_input=bool(getattr(obj, "apply_b_dec_to_input", False)), metadata=extra,
        )
    if "AutoEncoderTopK" in names:
        # encode() defaults to per-row top-k of relu(pre) (use_threshold=False)
        return SAE(
            _t(obj.encoder.weight).T, _t(obj.encoder.bias), linear_dec(), _t(obj.b_dec),
            activation="topk", k=int(obj.k), apply_b_dec_to_input=True, metadata=extra,
        )
    if "MatryoshkaBatchTopKSAE" in names or "BatchTopKSAE" in names:
        # encode() defaults to relu(pre) * (relu(pre) > threshold) (use_threshold=True), i.e. a
        # JumpReLU with that threshold; Matryoshka SAEs also zero the groups past active_groups.
        matryoshka = "MatryoshkaBatchTopKSAE" in names
        if matryoshka:
            W_enc, b_enc, W_dec = _t(obj.W_enc), _t(obj.b_enc), _t(obj.W_dec)
        else:
            W_enc, b_enc, W_dec = _t(obj.encoder.weight).T, _t(obj.encoder.bias), linear_dec()
        thr = torch.full((W_enc.shape[1],), float(obj.threshold), dtype=W_enc.dtype, device=W_enc.device)
        if matryoshka:
            stop = int(obj.group_indices[obj.active_groups])
            thr[stop:] = float("inf")
            extra["active_latents"] = stop
        return SAE(W_enc, b_enc, W_dec, _t(obj.b_dec), activation="jumprelu", threshold=thr,
                   apply_b_dec_to_input=True, metadata=extra)
    if "AutoEncoderNew" in names:
        # no input centring; the decoder's own bias is b_dec
        return SAE(
            _t(obj.encoder.weight).T, _t(obj.encoder.bias), linear_dec(), _t(obj.decoder.bias),
            activation="relu", apply_b_dec_to_input=False, metadata=extra,
        )
    if "AutoEncoder" in names:
        return SAE(
            _t(obj.encoder.weight).T, _t(obj.encoder.bias), linear_dec(), _t(obj.bias),
            activation="relu", apply_b_dec_to_input=True, metadata=extra,
        )
    raise _unsupported(obj, f"dictionary_learning class {type(obj).__name__} is not supported")
