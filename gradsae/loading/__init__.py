"""Loading SAEs written by other libraries, and writing them in SAELens layout.

    sae = gradsae.load_sae(path)                       # format detected from the files
    sae = gradsae.load_sae(path, format="sparsify", device="cuda", dtype=torch.bfloat16)
    sae.save(out_dir)                                  # SAELens layout

One module per format: :mod:`.saelens`, :mod:`.sparsify`, :mod:`.gemmascope`,
:mod:`.dictionary_learning`; :mod:`.readers` reads and validates the files for all of them;
:mod:`.objects` wraps live SAEs of other libraries. Importing this package serves
:meth:`gradsae.SAE.save` (SAELens layout) and :meth:`gradsae.SAE.from_object`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import sae as _sae
from ..errors import InputError, SAEFormatError
from ..sae import SAE
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


def load_sae(path, format: str | None = None, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Load an SAE from disk as a gradsae :class:`SAE`.

    Args:
        path: an SAE directory, or its weights file (``sae_weights.safetensors``,
            ``sae.safetensors``, ``params.npz`` / ``params.safetensors``, ``ae.pt``).
        format: ``"saelens"``, ``"sparsify"``, ``"gemmascope"`` or ``"dictionary_learning"``;
            ``None`` detects it from the file names.
        device: where the weights go (default ``"cpu"``).
        dtype: weight dtype (``torch.float32``, ``"bfloat16"``, ...); ``None`` keeps the stored
            dtype (SAELens: the ``dtype`` its config names).

    The hook name, model name and layer the checkpoint records are kept on ``sae.meta``, the
    rest of its config in ``sae.meta.extra``.

    Raises:
        InputError: ``format``, ``device`` or ``dtype`` is not a valid choice.
        SAEFormatError: the path matches no format, or a file is missing, truncated, corrupt,
            has missing tensors, shapes that disagree with each other or the config, an
            unsupported architecture, or non-finite weights. The message names the file.
    """
    try:
        dtype = parse_dtype(dtype)
    except SAEFormatError as e:
        raise InputError(str(e)) from None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a valid torch device ({e})") from None
    p = os_path(path)
    if format is None:
        fmt = detect_format(p)
    else:
        fmt = str(format).lower().replace("-", "_").replace(" ", "_")
        fmt = {"gemma_scope": "gemmascope", "sae_lens": "saelens", "dictionary": "dictionary_learning"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
        if not p.exists():
            raise SAEFormatError(f"{p}: no such file or directory")
    return _loader(fmt)(p, device=device, dtype=dtype)


__all__ = ["load_sae", "detect_format", "FORMATS"]
