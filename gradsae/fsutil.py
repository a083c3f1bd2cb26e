"""Writing files so that a crash never leaves a half-written one: write beside the target,
fsync, rename into place. Files and directories get the permissions the user's umask gives
a normally created file (temporary-file helpers default to owner-only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (or directory) under the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def make_temp_dir(parent, name: str) -> Path:
    """A new temporary directory beside its final ``name`` in ``parent``, with normal mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, normal_mode(directory=True))
    return tmp


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, give it normal
    permissions and rename it to ``path`` (atomic on POSIX). Nothing is left behind if
    ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, normal_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def atomic_write_text(path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""

    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, w)


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file at ``path`` (a plain path; callers wrap it in
    :func:`atomic_write`), byte for byte the same for the same tensors and metadata.

    safetensors keeps the metadata in a hash map whose iteration order changes from process to
    process, so two identical runs would write files that differ in their header. The header is
    rewritten here with the metadata keys sorted; its length, and so every tensor offset, is
    unchanged (reordering keys of a JSON object does not change its length).
    """
    import json
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # pragma: no cover - serde and json escape alike; keep the original then
            text = raw[8 : 8 + n]
        raw = raw[:8] + text.ljust(n, b" ") + raw[8 + n :]
    with open(path, "wb") as f:
        f.write(raw)
