"""Reading and validating SAE checkpoint files, shared by every format loader.

Every problem is raised as :class:`gradsae.SAEFormatError` with a message that starts with the
file it concerns and says what is wrong: a missing file or tensor, a truncated or corrupt file,
shapes that disagree with each other or with the config, non-finite weights. Nothing here
unpickles arbitrary objects: ``.pt`` files are read with ``torch.load(weights_only=True)`` and
``.npz`` files with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import SAEFormatError
from ..sae import SAE, non_finite_count

# dtype strings found in configs ("float32", "torch.bfloat16", ...)
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: Any, *, where: str = "dtype") -> torch.dtype | None:
    """``None``, a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise SAEFormatError(f"{where}: {dtype} is not a floating-point dtype")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise SAEFormatError(f"{where}: unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def fail(file: Path | str, problem: str) -> SAEFormatError:
    """The error for ``problem`` in ``file`` (returned, so callers write ``raise fail(...)``)."""
    return SAEFormatError(f"{file}: {problem}")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a readable file, else an error naming it and what it should hold."""
    if not path.is_file():
        raise fail(path, f"missing file ({what})")
    return path


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """A JSON object from ``path``; missing, unreadable or non-object files are errors."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(path, f"unreadable JSON ({e})") from None
    except OSError as e:
        raise fail(path, f"cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise fail(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on the CPU, with the layout checked first.

    The header is validated by hand before safetensors reads the file, so that a truncated
    download or corrupt bytes give a message saying so (and where) rather than a library
    error: the 8-byte header length, the JSON header, and every tensor's byte range against
    the file's size.
    """
    require_file(path, "safetensors weights")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail(path, f"truncated safetensors file: {size} bytes, shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise fail(
                    path,
                    f"truncated or corrupt safetensors file: the header claims {n} bytes but only "
                    f"{size - 8} follow the length field",
                )
            raw = f.read(n)
    except OSError as e:
        raise fail(path, f"cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(path, f"corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise fail(path, "corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise fail(path, f"corrupt safetensors header: no valid data_offsets for tensor {name!r}") from None
        if end > data_bytes or start > end:
            raise fail(
                path,
                f"truncated safetensors file: tensor {name!r} needs bytes {start}..{end} of the data "
                f"section, which has only {data_bytes} bytes",
            )
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and others
        raise fail(path, f"corrupt safetensors file ({type(e).__name__}: {e})") from None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """All arrays of an ``.npz`` file as CPU tensors (``allow_pickle=False``)."""
    import numpy as np

    require_file(path, "numpy .npz weights")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise fail(path, "not an .npz archive (a single .npy array?)")
            out = {}
            for key in data.files:
                arr = data[key]
                if arr.dtype.kind not in "fiub":
                    raise fail(path, f"array {key!r} has dtype {arr.dtype}, not numeric")
                out[key] = torch.from_numpy(np.ascontiguousarray(arr))
            return out
    except SAEFormatError:
        raise
    except (zipfile.BadZipFile, EOFError) as e:
        raise fail(path, f"truncated or corrupt .npz archive ({e})") from None
    except ValueError as e:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise fail(path, f"corrupt or unsupported .npz contents ({e})") from None
    except OSError as e:
        raise fail(path, f"cannot read .npz ({e})") from None


def read_torch_state_dict(path: Path) -> dict[str, Any]:
    """A state dict saved with ``torch.save``, read with ``weights_only=True``.

    A file holding anything but tensors and plain containers is refused (nothing arbitrary is
    unpickled); corrupt or truncated files are reported as such.
    """
    require_file(path, "torch state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re

        m = re.search(r"Unsupported (?:global|operand)[^\n]*?(GLOBAL [\w.]+|\d+)", str(e))
        what = f" (found {m.group(1)})" if m else ""
        raise fail(
            path,
            "refused to unpickle: the file holds objects other than tensors and plain containers, "
            f"and gradsae only loads .pt files with torch.load(weights_only=True){what}",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
        raise fail(path, f"truncated or corrupt torch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Mapping):
        raise fail(path, f"expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    return dict(obj)


def get_tensor(tensors: Mapping[str, Any], name: str, file: Path, *aliases: str) -> torch.Tensor:
    """``tensors[name]`` (or the first alias present), which must be a tensor."""
    for key in (name, *aliases):
        if key in tensors:
            t = tensors[key]
            if not isinstance(t, torch.Tensor):
                raise fail(file, f"entry {key!r} is a {type(t).__name__}, not a tensor")
            return t
    names = " or ".join(repr(k) for k in (name, *aliases))
    raise fail(file, f"missing tensor {names} (found: {sorted(map(str, tensors))})")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, file: Path, why: str = "") -> None:
    """Error unless ``t`` has exactly ``shape``."""
    if tuple(t.shape) != tuple(shape):
        extra = f" ({why})" if why else ""
        raise fail(file, f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}{extra}")


def check_config_dims(file: Path, cfg_file: Path, d_in: int, d_sae: int, cfg_d_in: Any, cfg_d_sae: Any) -> None:
    """Error when the config's ``d_in`` / ``d_sae`` disagree with the weights' shapes."""
    for label, cfg_val, actual in (("d_in", cfg_d_in, d_in), ("d_sae", cfg_d_sae, d_sae)):
        if cfg_val is None:
            continue
        try:
            ok = int(cfg_val) == actual
        except (TypeError, ValueError):
            raise fail(cfg_file, f"{label} is {cfg_val!r}, not an integer") from None
        if not ok:
            raise fail(file, f"weights have {label}={actual} but {cfg_file.name} says {label}={cfg_val}")


def check_finite(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Error naming the first tensor with a NaN or infinite entry (checked in bounded chunks)."""
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        bad = non_finite_count(t)
        if bad:
            raise fail(file, f"tensor {name!r} has non-finite values (NaN or inf; {bad} of {t.numel()} entries)")


def build_sae(
    file: Path,
    *,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | float | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    **kwargs: Any,
) -> SAE:
    """Check the canonical tensors (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, biases,
    threshold) against each other and for finiteness, place them on ``device`` in ``dtype``
    (``None``: the dtype of ``W_enc`` as stored), and build the :class:`SAE`.

    ``file`` names the weights file in every message. Remaining keyword arguments go to
    :class:`SAE` unchanged.
    """
    if W_enc.dim() != 2:
        raise fail(file, f"encoder weight has shape {list(W_enc.shape)}, expected 2-D")
    d_in, d_sae = W_enc.shape
    check_shape(W_dec, (d_sae, d_in), "W_dec", file, f"the encoder implies d_in={d_in}, d_sae={d_sae}")
    check_shape(b_enc, (d_sae,), "b_enc", file, f"d_sae={d_sae}")
    check_shape(b_dec, (d_in,), "b_dec", file, f"d_in={d_in}")
    named = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0:
            check_shape(threshold, (d_sae,), "threshold", file, f"one per latent, d_sae={d_sae}, or a scalar")
        named["threshold"] = threshold
    for name, t in named.items():
        if not t.is_floating_point():
            raise fail(file, f"tensor {name!r} has dtype {t.dtype}, expected floating point")
    check_finite(named, file)

    target = parse_dtype(dtype) or W_enc.dtype
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SAEFormatError(f"device {device!r} is not a valid torch device ({e})") from None
    placed = {k: v.to(device=dev, dtype=target).contiguous() for k, v in named.items()}
    if target != W_enc.dtype:
        # e.g. float32 weights beyond the float16 range
        for name, t in placed.items():
            if non_finite_count(t):
                raise fail(file, f"tensor {name!r} overflows {target} (non-finite after conversion)")
    # checked above, with the file's name in the message: the SAE need not check again
    return SAE(
        placed["W_enc"], placed["b_enc"], placed["W_dec"], placed["b_dec"],
        threshold=placed.get("threshold", threshold), check_finite=False, **kwargs,
    )


def hook_layer_from_name(name: str | None) -> int | None:
    """The layer number in a hook or module name (``blocks.6.hook_resid_post``,
    ``model.layers.6.mlp``, ``layers.6``, ``h.6``, ``layer_6``), else None."""
    import re

    if not name:
        return None
    m = re.search(r"(?:^|[./_])(?:blocks|layers|layer|h)[._](\d+)(?:$|[./_])", str(name))
    return int(m.group(1)) if m else None


def default_hook_out(hook_in: str | None) -> str | None:
    """A transcoder's output hook when its checkpoint names only the input: the
    ``blocks.L.hook_mlp_out`` of the input hook's layer (None without a layer)."""
    layer = hook_layer_from_name(hook_in)
    return None if layer is None else f"blocks.{layer}.hook_mlp_out"


def list_dir(path: Path, limit: int = 20) -> str:
    """A short listing of a directory for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "nothing (empty directory)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def os_path(path: Any) -> Path:
    """``path`` as an absolute-or-relative :class:`Path` with ``~`` expanded."""
    return Path(os.path.expanduser(os.fspath(path)))
