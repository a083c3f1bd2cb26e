"""SAEs from the Hugging Face Hub, through ``huggingface_hub`` and its cache.

    load_sae("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")   # repo + folder
    load_sae("EleutherAI/sae-llama-3-8b-32x", "layers.12")                          # sparsify
    load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")    # SAELens release

A repository id and a folder in it: only the files an SAE format can need are fetched from that
folder (``allow_patterns``: the SAELens, sparsify, Gemma Scope and dictionary_learning file
names; only the named format's when it is known: ``format=``, or a SAELens release), then read by the
format loaders exactly as a local directory. A SAELens release name is
looked up in SAELens' registry of pretrained SAEs (``sae_lens`` must be installed): the
registry gives the repository, the folder (``canonical`` ids map to their folder), the file
layout and, for SAEs trained with ``expected_average_only_in``, the ``norm_scaling_factor``
that is folded into the weights (``W_enc * s``, ``W_dec / s``, ``b_dec / s``), as SAELens does.

The cache is ``huggingface_hub``'s: ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), read when a call
is made. With ``HF_HUB_OFFLINE=1`` nothing is fetched, and a file missing from the cache is an
:class:`~gradsae.SAEFormatError` naming the repository, the file and how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import InputError, SAEFormatError

# every file name a supported format reads from an SAE folder
SAE_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "activation_scaler.json",
    "sae.safetensors",
    "params.npz",
    "params.safetensors",
    "config.json",
    "ae.pt",
)
# what each format reads (when the format is known, only these are fetched)
FORMAT_FILES = {
    "saelens": ("cfg.json", "sae_weights.safetensors", "activation_scaler.json"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "gemmascope": ("params.npz", "params.safetensors", "config.json"),
    "dictionary_learning": ("ae.pt", "config.json"),
}
# the files a format cannot do without (any one of each tuple)
REQUIRED = {
    "saelens": (("cfg.json",), ("sae_weights.safetensors",)),
    "sparsify": (("cfg.json",), ("sae.safetensors",)),
    "gemmascope": (("params.npz", "params.safetensors"),),
    "dictionary_learning": (("ae.pt",), ("config.json",)),
}
# SAELens registry conversions gradsae reads with its own loaders
_CONVERSIONS = {
    None: None,
    "sae_lens": "saelens",
    "gemma_2": "gemmascope",
    "gemma_2_transcoder": "gemmascope",
    "gemma_3": "gemmascope",
    "sparsify": "sparsify",
    "dictionary_learning_1": "dictionary_learning",
}
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _truthy(v: str | None) -> bool:
    return str(v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """Whether the Hub is off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """``huggingface_hub``'s cache directory as the environment says now: ``HF_HUB_CACHE``,
    else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_repo_id(text: str) -> bool:
    """``org/name`` that could be a Hub repository id."""
    return bool(_REPO_RE.match(str(text)))


def _hub():
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise InputError(
            "loading SAEs from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub"
        ) from None
    return huggingface_hub, errors


def _fetch_hint(repo_id: str, folder: str) -> str:
    inc = f" --include '{folder}/*'" if folder else ""
    return f"fetch it once online (unset HF_HUB_OFFLINE), or run `hf download {repo_id}{inc}`"


def fetch_folder(repo_id: str, folder: str, revision: str | None = None,
                 fmt: str | None = None) -> tuple[Path, str, str | None]:
    """``(local directory, folder, file)``: the local copy (in the cache's snapshot) of
    ``folder`` of Hub repository ``repo_id``, with only the files format ``fmt`` reads fetched
    (:data:`FORMAT_FILES`; any format's, :data:`SAE_FILES`, when ``fmt`` is None). When
    ``folder`` ends with a file name (``.../params.npz``), ``folder`` is its directory and
    ``file`` that name (else None). Raises :class:`SAEFormatError` when offline and nothing is
    cached, or when the repository or revision does not exist."""
    hub, errs = _hub()
    folder = folder.strip("/")
    named_file = None
    if re.search(r"\.(safetensors|npz|pt|json)$", folder):
        folder, _, named_file = folder.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    patterns = [prefix + name for name in FORMAT_FILES.get(fmt, SAE_FILES)]
    if named_file is not None and named_file not in SAE_FILES:
        patterns.append(prefix + named_file)
    cache = cache_dir()
    off = offline()
    incomplete = getattr(errs, "IncompleteSnapshotError", ())
    try:
        root = hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, cache_dir=str(cache), local_files_only=off,
        )
    except incomplete as e:
        # the cached listing shows files of these patterns missing; offline, let the caller name
        # the file the format needs (an optional one may be all that is missing)
        if not off:
            raise SAEFormatError(
                f"{repo_id}: cannot reach the Hub to fetch {prefix or 'the repository'}, and the cache {cache} "
                "holds only part of it"
            ) from None
        root = e.snapshot_path
    except errs.LocalEntryNotFoundError:
        where = f"{prefix}{named_file or ''}" or "(the repository)"
        if off:
            raise SAEFormatError(
                f"{repo_id}: {where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                + _fetch_hint(repo_id, folder)
            ) from None
        raise SAEFormatError(
            f"{repo_id}: cannot reach the Hub to fetch {where}, and it is not in the cache {cache}"
        ) from None
    except errs.RepositoryNotFoundError:
        raise SAEFormatError(
            f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except errs.RevisionNotFoundError:
        raise SAEFormatError(f"{repo_id}: no revision {revision!r}") from None
    except errs.HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFormatError(f"{repo_id}: the Hub refused {prefix or 'the repository'} ({first})") from None
    return (Path(root) / folder if folder else Path(root)), folder, named_file


def missing(repo_id: str, folder: str, files: list[str], what: str | None = None) -> SAEFormatError:
    """The error for ``files`` (alternatives) of ``folder`` missing from repository ``repo_id``:
    not in the cache (offline) or not in the repository."""
    rel = [f"{folder}/{f}" if folder else f for f in files]
    what = what or (rel[0] if len(rel) == 1 else " or ".join(rel))
    if offline():
        return SAEFormatError(
            f"{repo_id}: {what} is not in the Hugging Face cache {cache_dir()} and HF_HUB_OFFLINE is set; "
            + _fetch_hint(repo_id, folder)
        )
    return SAEFormatError(f"{repo_id}: has no {what} (the SAE files of that folder)")


def check_complete(repo_id: str, folder: str, local: Path, fmt: str | None) -> None:
    """Error naming the repository and file when the local copy of ``folder`` lacks a file
    the format needs (or holds no SAE file at all, ``fmt`` None)."""
    if fmt is None:
        where = f"{folder}/" if folder else "the repository's top folder"
        raise missing(repo_id, folder, [], f"{where} (an SAE: cfg.json + sae_weights.safetensors, params.npz, "
                                           "sae.safetensors, or ae.pt + config.json)")
    for alternatives in REQUIRED.get(fmt, ()):
        if not any((local / name).is_file() for name in alternatives):
            raise missing(repo_id, folder, list(alternatives))


# -------------------------------------------------------------------------------- SAELens registry
def saelens_registry() -> dict:
    """SAELens' registry of pretrained SAEs (release name -> lookup); an error naming the
    package to install when ``sae_lens`` is not installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise InputError(
            "SAELens release names are resolved through SAELens' registry: pip install sae-lens "
            "(or pass the Hub repository id and the SAE's folder in it)"
        ) from None
    return get_pretrained_saes_directory()


def resolve_release(release: str, sae_id: str) -> dict[str, Any]:
    """``{"repo_id", "folder", "format", "norm_scaling_factor", "model", "release", "sae_id"}``
    of ``sae_id`` in the SAELens release ``release``."""
    lookup = saelens_registry().get(release)
    if lookup is None:
        raise InputError(f"{release!r} is no SAELens release (and no local path); pass a release name, or a "
                         "Hub repository id 'org/name' with the SAE's folder")
    if sae_id is None or sae_id not in lookup.saes_map:
        ids = sorted(lookup.saes_map)
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
        raise InputError(f"SAELens release {release!r} has no SAE id {sae_id!r}; its ids: {shown}")
    conv = lookup.conversion_func
    if conv not in _CONVERSIONS:
        raise InputError(
            f"SAELens release {release!r} uses the {conv!r} conversion, which gradsae does not read; load it with "
            "sae_lens.SAE.from_pretrained(...) and pass the object to gradsae.SAE.from_object"
        )
    return {
        "repo_id": lookup.repo_id,
        "folder": str(lookup.saes_map[sae_id]),
        "format": _CONVERSIONS[conv],
        "norm_scaling_factor": lookup.norm_scaling_factor.get(sae_id),
        "model": lookup.model,
        "release": release,
        "sae_id": sae_id,
    }


__all__ = ["fetch_folder", "check_complete", "resolve_release", "saelens_registry", "offline", "cache_dir",
           "is_repo_id", "missing", "SAE_FILES"]
