"""Loading SAEs written by other libraries, and writing them in SAELens layout.

    sae = gradsae.load_sae(path)                       # format detected from the files
    sae = gradsae.load_sae(path, format="sparsify", device="cuda", dtype=torch.bfloat16)
    sae = gradsae.load_sae("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")  # Hub
    sae.save(out_dir)                                  # SAELens layout

One module per format: :mod:`.saelens`, :mod:`.sparsify`, :mod:`.gemmascope`,
:mod:`.dictionary_learning`; :mod:`.readers` reads and validates the files for all of them;
:mod:`.objects` wraps live SAEs of other libraries; :mod:`.hub` fetches SAEs from the Hugging
Face Hub (repository + folder, or a SAELens release name). Importing this package serves
:meth:`gradsae.SAE.save` (SAELens layout) and :meth:`gradsae.SAE.from_object`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .. import sae as _sae
from ..errors import InputError, SAEFormatError
from ..sae import SAE
from . import hub
from .objects import sae_from_object
from .readers import list_dir, os_path, parse_dtype, read_json
from .saelens import save_saelens

_sae.provide("save", save_saelens)
_sae.provide("from_object", sae_from_object)

FORMATS = ("saelens", "sparsify", "gemmascope", "dictionary_learning")

# what identifies each format: a file name, in a directory or given directly
_MARKERS = {
    "sae_weights.safetensors": "saelens",
    "sae.safetensors": "sparsify",
    "params.npz": "gemmascope",
    "params.safetensors": "gemmascope",
    "ae.pt": "dictionary_learning",
}


def _loader(fmt: str) -> Callable[..., SAE]:
    if fmt == "saelens":
        from .saelens import load_saelens as fn
    elif fmt == "sparsify":
        from .sparsify import load_sparsify as fn
    elif fmt == "gemmascope":
        from .gemmascope import load_gemmascope as fn
    else:
        from .dictionary_learning import load_dictionary_learning as fn
    return fn


def detect_format(path) -> str:
    """The format of an SAE directory or weights file, from the file names it holds.

    Raises :class:`SAEFormatError` listing what was found when nothing matches.
    """
    p = os_path(path)
    if not p.exists():
        raise SAEFormatError(f"{p}: no such file or directory")
    if p.is_file():
        if p.name in _MARKERS:
            return _MARKERS[p.name]
        if p.suffix == ".npz":
            return "gemmascope"
        if p.suffix == ".pt":
            return "dictionary_learning"
        if p.name in ("cfg.json", "config.json"):
            return detect_format(p.parent)
        raise SAEFormatError(
            f"{p}: cannot tell the SAE format from this file's name; expected one of "
            f"{sorted(_MARKERS)} (or a .npz / .pt file), or its directory. Pass format= one of {FORMATS}"
        )
    found = [fmt for name, fmt in _MARKERS.items() if (p / name).is_file()]
    if len(set(found)) == 1:
        return found[0]
    if len(set(found)) > 1:
        raise SAEFormatError(
            f"{p}: holds files of several SAE formats ({', '.join(sorted(set(found)))}); pass format="
        )
    # a config without its weights: let that format's loader name the missing file
    if (p / "cfg.json").is_file():
        cfg = read_json(p / "cfg.json")
        return "sparsify" if ("num_latents" in cfg or "expansion_factor" in cfg) else "saelens"
    if (p / "config.json").is_file() and isinstance(read_json(p / "config.json").get("trainer"), dict):
        return "dictionary_learning"
    subdirs = sorted(
        d.name for d in p.iterdir() if d.is_dir() and any((d / n).is_file() for n in _MARKERS)
    ) if p.is_dir() else []
    hint = f"; its subdirectories {subdirs[:10]} hold SAEs: load one of them" if subdirs else ""
    raise SAEFormatError(
        f"{p}: no SAE found. It holds: {list_dir(p)}. Expected sae_weights.safetensors + cfg.json "
        f"(SAELens), sae.safetensors + cfg.json (sparsify), params.npz or params.safetensors "
        f"(Gemma Scope), or ae.pt + config.json (dictionary_learning){hint}"
    )


def load_sae(path, sae_id: str | None = None, format: str | None = None, device: Any = "cpu",
             dtype: Any = None, *, revision: str | None = None) -> SAE:
    """Load an SAE from disk or from the Hugging Face Hub as a gradsae :class:`SAE`.

        load_sae("path/to/sae")                                                   # a local path
        load_sae("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")  # repo + folder
        load_sae("EleutherAI/sae-llama-3-8b-32x", "layers.12")                     # sparsify on the Hub
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")  # SAELens release

    Args:
        path: an SAE directory, or its weights file (``sae_weights.safetensors``,
            ``sae.safetensors``, ``params.npz`` / ``params.safetensors``, ``ae.pt``); a Hub
            repository id ``org/name``; or a SAELens release name (needs ``sae_lens``). A local
            path wins over a Hub id of the same spelling.
        sae_id: the SAE inside ``path``: the folder in the Hub repository (or in the local
            directory), or the SAE id of the SAELens release (``canonical`` ids included).
        format: ``"saelens"``, ``"sparsify"``, ``"gemmascope"`` or ``"dictionary_learning"``;
            ``None`` detects it from the file names.
        device: where the weights go (default ``"cpu"``).
        dtype: weight dtype (``torch.float32``, ``"bfloat16"``, ...); ``None`` keeps the stored
            dtype (SAELens: the ``dtype`` its config names).
        revision: the Hub revision (branch, tag or commit); default ``main``.

    From the Hub only the files an SAE format reads are fetched, into ``huggingface_hub``'s
    cache (``HF_HUB_CACHE`` / ``HF_HOME``); ``HF_HUB_OFFLINE=1`` reads the cache only (see
    :mod:`gradsae.loading.hub`). The hook name, model name and layer the checkpoint records are
    kept on ``sae.meta``, the rest of its config in ``sae.meta.extra`` (with ``hub``: where it
    came from).

    Raises:
        InputError: ``format``, ``device`` or ``dtype`` is not a valid choice; an unknown
            SAELens release or SAE id; a release name without ``sae_lens`` installed.
        SAEFormatError: the path matches no format, or a file is missing, truncated, corrupt,
            has missing tensors, shapes that disagree with each other or the config, an
            unsupported architecture, or non-finite weights; a Hub file that is not cached
            while offline. The message names the file (and the repository).
    """
    try:
        dtype = parse_dtype(dtype)
    except SAEFormatError as e:
        raise InputError(str(e)) from None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a valid torch device ({e})") from None
    fmt = None if format is None else _format_name(format)
    if sae_id is not None and not isinstance(sae_id, str):
        raise InputError(f"sae_id must be a string (a folder or SAE id), got {type(sae_id).__name__}")
    p = os_path(path)
    if p.exists():
        positional_format = format is None and _format_name(sae_id or "", strict=False) is not None
        if sae_id is not None and positional_format and not (p / sae_id).exists():
            fmt = _format_name(sae_id)  # load_sae(path, "sparsify"): the format, positionally
        elif sae_id is not None:
            p = p / sae_id
        return _load_local(p, fmt, device, dtype)
    text = os.fspath(path) if not isinstance(path, str) else path
    if hub.is_repo_id(text):  # SAELens release names hold no '/'
        if sae_id is None:
            raise SAEFormatError(
                f"{text}: no such local path; to load from the Hugging Face Hub pass the SAE's folder in the "
                f"repository too: load_sae({text!r}, 'folder/of/the/sae')"
            )
        return _load_hub(text, sae_id, fmt, device, dtype, revision)
    if "/" not in text.strip("/"):
        if sae_id is None:
            raise SAEFormatError(f"{p}: no such file or directory (a SAELens release name needs its SAE id too)")
        found = hub.resolve_release(text, sae_id)
        sae = _load_hub(found["repo_id"], found["folder"], fmt or found["format"], device, dtype, revision,
                        release=found)
        return sae
    raise SAEFormatError(f"{p}: no such file or directory")


def _format_name(format, strict: bool = True) -> str | None:
    fmt = str(format).lower().replace("-", "_").replace(" ", "_")
    fmt = {"gemma_scope": "gemmascope", "sae_lens": "saelens", "dictionary": "dictionary_learning"}.get(fmt, fmt)
    if fmt not in FORMATS:
        if not strict:
            return None
        raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
    return fmt


def _load_local(p, fmt, device, dtype) -> SAE:
    if fmt is None:
        fmt = detect_format(p)
    elif not p.exists():
        raise SAEFormatError(f"{p}: no such file or directory")
    return _loader(fmt)(p, device=device, dtype=dtype)


def _load_hub(repo_id, folder, fmt, device, dtype, revision, release=None) -> SAE:
    local, folder_only, named = hub.fetch_folder(repo_id, folder, revision, fmt)
    target = local / named if named else local
    if named and not target.is_file():
        raise hub.missing(repo_id, folder_only, [named])
    if fmt is None:
        try:
            fmt = detect_format(target) if target.exists() else None
        except SAEFormatError:
            fmt = None
    if not named:
        hub.check_complete(repo_id, folder_only, local, fmt)
    sae = _loader(fmt)(target, device=device, dtype=dtype)
    info = {"repo_id": repo_id, "folder": folder, "revision": revision or "main"}
    if release is not None:
        info.update(release=release["release"], sae_id=release["sae_id"])
        factor = release.get("norm_scaling_factor")
        unfolded = "folded_scaling_factor" not in sae.meta.extra
        trained_scaled = sae.meta.extra.get("normalize_activations") == "expected_average_only_in"
        if trained_scaled and factor is not None and unfolded:
            sae = _fold_norm_scaling(sae, float(factor))
        if sae.meta.model_name is None and release.get("model"):
            sae.meta.model_name = release["model"]
    sae.meta.extra["hub"] = info
    return sae


def _fold_norm_scaling(sae: SAE, s: float) -> SAE:
    """The SAE that reads raw inputs as ``sae`` reads inputs scaled by ``s`` (SAELens'
    ``fold_activation_norm_scaling_factor``)."""
    meta = dict(sae.meta.extra, folded_scaling_factor=s)
    return SAE(sae.W_enc * s, sae.b_enc, sae.W_dec / s, sae.b_dec / s, activation=sae.activation, k=sae.k,
               threshold=sae.threshold, apply_b_dec_to_input=sae.apply_b_dec_to_input,
               normalize_activations=sae.normalize_activations,
               rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, hook_name=sae.meta.hook_name,
               model_name=sae.meta.model_name, hook_layer=sae.meta.hook_layer, metadata=meta, check_finite=False,
               transcoder=sae.transcoder, W_skip=sae.W_skip, hook_name_out=sae.meta.hook_name_out)


__all__ = ["load_sae", "detect_format", "FORMATS"]
