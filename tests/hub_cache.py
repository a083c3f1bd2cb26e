"""A Hugging Face Hub cache written on disk as ``huggingface_hub`` writes it, for offline tests.

    <cache>/models--org--name/blobs/<sha256 of the file>        the bytes
    <cache>/models--org--name/snapshots/<commit>/<path>         a relative link to the blob
    <cache>/models--org--name/refs/main                         the commit hash

Files are first written to an ordinary directory by the writers of ``tests/sae_files.py`` (or
any other way) and then moved into the cache with :func:`add_to_cache`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_to_cache(cache: Path, repo_id: str, src: Path, prefix: str = "", commit: str | None = None) -> Path:
    """Put every file under ``src`` into the cached snapshot of ``repo_id`` at ``prefix/<its
    path under src>`` and point ``refs/main`` at that snapshot. Returns the snapshot folder."""
    root = repo_folder(cache, repo_id)
    refs = root / "refs" / "main"
    if commit is None:
        commit = refs.read_text() if refs.is_file() else secrets.token_hex(20)
    snap = root / "snapshots" / commit
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        rel = Path(prefix) / f.relative_to(src) if prefix else f.relative_to(src)
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    shutil.rmtree(src)
    return snap


def blob_of(cache: Path, repo_id: str, path: str) -> Path:
    """The blob a cached file links to (to corrupt it)."""
    root = repo_folder(cache, repo_id)
    commit = (root / "refs" / "main").read_text()
    return (root / "snapshots" / commit / path).resolve()
