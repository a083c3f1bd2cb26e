"""Launch configurations shared by the kernels: interpreter detection and autotune lists.

On a GPU the encode kernels are autotuned over tile shapes that suit Hopper (H100/H200:
large tiles, deep pipelines) and Ampere (A100: smaller K steps); the best configuration is
cached per shape key by Triton's autotuner. Under ``TRITON_INTERPRET=1`` (CPU tests) one
small configuration is used, since every program is simulated with numpy.
"""

from __future__ import annotations

import os

import torch
import triton

# Widest d_sae tile any configuration uses; d_sae splits are multiples of it so the split
# layout does not depend on the configuration the autotuner picks.
SPLIT_GRANULE = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cfg(bm, bn, bk, stages, warps):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=stages, num_warps=warps)


# (BM, BN, BK, stages, warps). The top-k epilogue keeps a [BM, BN] and a [BM, KP] int64 key
# block in registers, so the row tile stays moderate and 8 warps are offered for the larger
# tiles (ptxas reports register spills at 64x128 with 4 warps); BN >= KP is required (pruned
# below), and every BN divides SPLIT_GRANULE.
_HOPPER = [
    (64, 128, 64, 4, 4),
    (64, 128, 64, 3, 8),
    (128, 128, 64, 3, 8),
    (128, 64, 64, 4, 4),
    (64, 256, 64, 3, 8),
    (128, 256, 64, 3, 8),
    (32, 256, 64, 4, 4),
    (64, 64, 128, 4, 4),
    (32, 128, 64, 4, 4),
    (64, 64, 64, 4, 8),
]
_AMPERE = [
    (64, 128, 32, 4, 4),
    (128, 128, 32, 3, 8),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 256, 32, 3, 8),
    (32, 256, 32, 4, 4),
]


def encode_configs() -> list:
    """Autotune candidates for the encode kernels on the current CUDA device."""
    if interpreting() or not torch.cuda.is_available():
        return [_cfg(16, 32, 16, 1, 1)]
    major, _ = torch.cuda.get_device_capability()
    table = _HOPPER if major >= 9 else _AMPERE
    return [_cfg(*c) for c in table]


def prune_encode_configs(configs, named_args, **kwargs):
    """Drop configurations whose d_sae tile cannot hold the top-k (BN >= KP), and shrink the
    interpreter's single configuration to fit."""
    kp = named_args.get("KP", kwargs.get("KP", 1))
    kept = [c for c in configs if c.kwargs["BN"] >= kp]
    if kept:
        return kept
    # No tuned tile is wide enough: widen the narrowest one.
    base = configs[0]
    kw = dict(base.kwargs)
    kw["BN"] = next_pow2(kp)
    return [triton.Config(kw, num_stages=base.num_stages, num_warps=base.num_warps)]


def interpreter_config(kp: int, cols: int, n: int) -> dict:
    """The tile shape used under the interpreter: few, wide tiles (numpy is fast per element
    and slow per operation), at least KP wide, at most 8192 (``cols`` = columns per split),
    and no more rows than there are tokens (``n``)."""
    return {"BM": min(32, next_pow2(max(n, 2))), "BN": max(64, next_pow2(kp), min(8192, next_pow2(cols) // 2)), "BK": 32}


def fixed_config(kp: int, cols: int, n: int) -> tuple[dict, int, int]:
    """A fixed (not autotuned) configuration: meta-parameters, num_warps, num_stages.
    Used for deterministic runs so the accumulation order never depends on a tuning race,
    and under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return interpreter_config(kp, cols, n), 1, 1
    bn = max(128, next_pow2(kp))
    bm = 64 if bn <= 128 else 32
    major, _ = torch.cuda.get_device_capability()
    return {"BM": bm, "BN": bn, "BK": 64 if major >= 9 else 32}, 4, 3


def num_sms() -> int:
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
