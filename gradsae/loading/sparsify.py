"""EleutherAI sparsify checkpoints: one directory per hookpoint (``layers.6``,
``layers.6.mlp``, ...) holding ``cfg.json`` and ``sae.safetensors``.

``cfg.json`` is the sparse coder's config plus ``d_in``: ``activation`` (``topk``; ``groupmax``
is not supported), ``expansion_factor``, ``num_latents`` (0 means ``d_in * expansion_factor``),
``k``, ``normalize_decoder``, ``multi_topk``, ``skip_connection``, ``transcode``.
``sae.safetensors`` holds ``encoder.weight [d_sae, d_in]`` (an ``nn.Linear``, hence transposed
relative to gradsae's ``W_enc``), ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]`` (already in
gradsae's orientation: no transpose) and ``b_dec [d_in]``.

sparsify encodes ``topk(relu(encoder(x - b_dec)))`` and decodes ``acts @ W_dec + b_dec``: a
gradsae ``topk`` SAE with ``apply_b_dec_to_input=True`` whatever ``normalize_decoder`` says.

A transcoder (``transcode=true``) encodes ``topk(relu(encoder(x)))`` (no ``b_dec`` subtracted),
reads the input of the hookpoint's module and stands for its output; with
``skip_connection=true`` it adds ``x @ W_skip.T`` (``W_skip [d_in, d_in]``). It loads as a
gradsae transcoder whose input and output hooks are both the hookpoint (the module's input and
output, see :mod:`gradsae.model.transcoder`). A skip connection on an autoencoder is refused.

The hook is the directory's name (sparsify's hookpoint, a module path such as ``layers.6``);
the layer is read from it, and the model name from the run's ``config.json`` one level up when
that file names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sae import SAE
from .readers import (
    build_sae,
    check_config_dims,
    check_finite,
    check_shape,
    fail,
    get_tensor,
    hook_layer_from_name,
    read_json,
    read_safetensors,
)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"


def load_sparsify(path: Path, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Load a sparsify hookpoint directory (or its ``sae.safetensors``)."""
    folder = path.parent if path.is_file() else path
    cfg_file = folder / CFG_FILENAME
    weights_file = path if path.is_file() and path.suffix == ".safetensors" else folder / WEIGHTS_FILENAME
    cfg = read_json(cfg_file, "sparsify config")

    transcode = bool(cfg.get("transcode"))
    if cfg.get("skip_connection") and not transcode:
        raise fail(cfg_file, "has a skip connection (skip_connection=true) on an autoencoder, which gradsae does "
                             "not support (it does on transcoders)")
    if cfg.get("signed"):
        raise fail(cfg_file, "uses signed activations (signed=true), which gradsae does not support")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise fail(cfg_file, f"unsupported activation {activation!r} (gradsae supports topk)")
    k = cfg.get("k")
    if k is None:
        raise fail(cfg_file, "missing k (number of active latents)")
    if not isinstance(k, int) or k < 1:
        raise fail(cfg_file, f"k must be a positive integer, got {k!r}")

    tensors = read_safetensors(weights_file)
    W_skip = None
    if "W_skip" in tensors and not (transcode and cfg.get("skip_connection")):
        raise fail(weights_file, "holds W_skip but its config has no skip_connection=true transcoder")
    if transcode and cfg.get("skip_connection"):
        W_skip = get_tensor(tensors, "W_skip", weights_file)
    enc_w = get_tensor(tensors, "encoder.weight", weights_file)
    enc_b = get_tensor(tensors, "encoder.bias", weights_file)
    W_dec = get_tensor(tensors, "W_dec", weights_file)
    b_dec = get_tensor(tensors, "b_dec", weights_file)
    if enc_w.dim() != 2:
        raise fail(weights_file, f"tensor 'encoder.weight' has shape {list(enc_w.shape)}, expected [d_sae, d_in]")
    d_sae, d_in = enc_w.shape
    num_latents = cfg.get("num_latents") or None
    if num_latents is None and cfg.get("d_in") is not None and cfg.get("expansion_factor") is not None:
        try:
            num_latents = int(cfg["d_in"]) * int(cfg["expansion_factor"])
        except (TypeError, ValueError):
            raise fail(cfg_file, "d_in and expansion_factor must be integers") from None
    check_config_dims(weights_file, cfg_file, d_in, d_sae, cfg.get("d_in"), num_latents)
    if W_skip is not None:
        check_shape(W_skip, (d_in, d_in), "W_skip", weights_file, "[d_in, d_in]")
        check_finite({"W_skip": W_skip}, weights_file)

    hook_name = folder.resolve().name
    model_name = None
    run_cfg = folder.resolve().parent / "config.json"
    if run_cfg.is_file():
        model = read_json(run_cfg, "sparsify run config").get("model")
        model_name = model if isinstance(model, str) else None
    extra = {kk: v for kk, v in cfg.items() if kk != "d_in"}
    extra["format"] = "sparsify"

    return build_sae(
        weights_file,
        W_enc=enc_w.T, b_enc=enc_b, W_dec=W_dec, b_dec=b_dec,
        device=device, dtype=dtype,
        activation="topk", k=k, apply_b_dec_to_input=not transcode,
        hook_name=hook_name, model_name=model_name, hook_layer=hook_layer_from_name(hook_name),
        metadata=extra,
        **({"transcoder": True, "hook_name_out": hook_name, "W_skip": W_skip} if transcode else {}),
    )
