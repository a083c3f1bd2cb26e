"""Gemma Scope JumpReLU SAEs: ``params.npz`` (Gemma Scope) or ``params.safetensors`` with
lowercase keys (Gemma Scope 2, beside a ``config.json``).

Arrays: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
``threshold [d_sae]`` (``w_enc``, ``w_dec``, ... in the safetensors files). The SAE is
``z = pre * (pre > threshold)`` with ``pre = x @ W_enc + b_enc`` (``b_dec`` is *not*
subtracted from the input) and ``x_hat = z @ W_dec + b_dec``.

The files carry no hook metadata, so it is read from the path, modestly:
- ``hook_layer`` from a ``layer_<n>`` component (``layer_12/width_16k/average_l0_82`` or
  ``layer_12_width_16k_l0_big``);
- ``hook_name`` = ``blocks.<n>.hook_resid_post`` when the path names a residual-stream release
  (``...-res...`` or ``resid_post``), ``blocks.<n>.hook_mlp_out`` for ``...-mlp...``, else None;
- ``model_name`` from a Gemma Scope release name in the path (``gemma-scope-2b-pt-res`` ->
  ``gemma-2-2b``, ``gemma-scope-9b-it-res`` -> ``gemma-2-9b-it``, ``gemma-scope-2-1b-pt`` ->
  ``gemma-3-1b-pt``), else None.
A ``config.json`` beside the weights is kept verbatim in the metadata.

Transcoders (a path naming ``transcoder`` or ``transcoders``, as Gemma Scope's
``gemma-scope-2b-pt-transcoders`` and Gemma Scope 2's ``transcoder_all/...``, or a file holding an
``affine_skip_connection``) have the same arrays and read the MLP's input,
``blocks.<n>.ln2.hook_normalized`` (the MLP module's input, after the pre-MLP norm), standing for
``blocks.<n>.hook_mlp_out``. Gemma Scope 2's ``..._affine`` transcoders add
``x @ affine_skip_connection`` (stored ``[d_in, d_out]``) to the output.
"""

from __future__ import annotations

import re
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
    read_json,
    read_npz,
    read_safetensors,
)

NPZ_FILENAME = "params.npz"
SAFETENSORS_FILENAME = "params.safetensors"
_KNOWN = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
SKIP = "affine_skip_connection"


def find_weights(path: Path) -> Path:
    """The weights file for a directory or a file path."""
    if path.is_file():
        return path
    for name in (NPZ_FILENAME, SAFETENSORS_FILENAME):
        if (path / name).is_file():
            return path / name
    raise fail(path, f"missing file ({NPZ_FILENAME} or {SAFETENSORS_FILENAME})")


def path_metadata(path: Path) -> dict[str, Any]:
    """``hook_layer``, ``hook_name`` and ``model_name`` guessed from a Gemma Scope path."""
    # the file's own name, not its link target (the Hub cache links files to content-named blobs)
    text = (path.parent.resolve() / path.name).as_posix() if path.is_file() else path.resolve().as_posix()
    m = re.search(r"(?:^|/)layer_(\d+)(?:$|[/_])", text)
    layer = int(m.group(1)) if m else None
    hook = None
    if layer is not None:
        if re.search(r"resid_post|gemma-scope-[^/]*-res\b|[-_]res(?:[-_/]|$)", text):
            hook = f"blocks.{layer}.hook_resid_post"
        elif re.search(r"gemma-scope-[^/]*-mlp\b|mlp_out", text):
            hook = f"blocks.{layer}.hook_mlp_out"
    model = None
    m2 = re.search(r"gemma-scope-2-(\d+(?:\.\d+)?[bm])-(pt|it)", text)
    m1 = re.search(r"gemma-scope-(\d+b)-(pt|it)", text)
    if m2:
        model = f"gemma-3-{m2.group(1)}-{m2.group(2)}"
    elif m1:
        model = f"gemma-2-{m1.group(1)}" + ("-it" if m1.group(2) == "it" else "")
    transcoder = bool(re.search(r"transcoder", text))
    return {"hook_layer": layer, "hook_name": hook, "model_name": model, "transcoder": transcoder}


def load_gemmascope(path: Path, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Load a Gemma Scope ``params.npz`` / ``params.safetensors`` (or its directory)."""
    weights_file = find_weights(path)
    if weights_file.suffix == ".npz":
        raw = read_npz(weights_file)
    elif weights_file.suffix == ".safetensors":
        raw = read_safetensors(weights_file)
    else:
        raise fail(weights_file, "not a Gemma Scope weights file (expected .npz or .safetensors)")
    # w_enc -> W_enc, w_dec -> W_dec; other keys as they are
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    skip = tensors.pop(SKIP, None)
    unknown = sorted(set(tensors) - _KNOWN)
    if unknown:
        raise fail(
            weights_file,
            f"holds arrays gradsae cannot interpret: {unknown} (a transcoder or skip connection?); "
            f"a Gemma Scope SAE has {sorted(_KNOWN)}",
        )
    W_enc = get_tensor(tensors, "W_enc", weights_file)
    threshold = get_tensor(tensors, "threshold", weights_file)
    if W_enc.dim() != 2:
        raise fail(weights_file, f"array 'W_enc' has shape {list(W_enc.shape)}, expected [d_in, d_sae]")

    extra: dict[str, Any] = {"format": "gemmascope"}
    cfg_file = weights_file.parent / "config.json"
    if cfg_file.is_file():
        cfg = read_json(cfg_file, "Gemma Scope config")
        width = cfg.get("width")
        if isinstance(width, int):
            check_config_dims(weights_file, cfg_file, W_enc.shape[0], W_enc.shape[1], None, width)
        extra["config"] = cfg
    meta = path_metadata(weights_file)
    transcoder_kw: dict[str, Any] = {}
    if skip is not None or meta.pop("transcoder"):
        layer = meta["hook_layer"]
        meta["hook_name"] = None if layer is None else f"blocks.{layer}.ln2.hook_normalized"
        transcoder_kw = {"transcoder": True, "hook_name_out": None if layer is None else f"blocks.{layer}.hook_mlp_out"}
        if skip is not None:
            d_in = W_enc.shape[0]
            check_shape(skip, (d_in, d_in), SKIP, weights_file, "[d_in, d_out] with d_out == d_in")
            check_finite({SKIP: skip}, weights_file)
            transcoder_kw["W_skip"] = skip.T
    meta.pop("transcoder", None)

    return build_sae(
        weights_file,
        W_enc=W_enc, b_enc=get_tensor(tensors, "b_enc", weights_file),
        W_dec=get_tensor(tensors, "W_dec", weights_file), b_dec=get_tensor(tensors, "b_dec", weights_file),
        threshold=threshold, device=device, dtype=dtype,
        activation="jumprelu", apply_b_dec_to_input=False,
        metadata=extra, **meta, **transcoder_kw,
    )
