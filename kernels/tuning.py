"""Launch configurations shared by the kernels: interpreter detection and autotune lists.

On a GPU the fused encode kernels are autotuned over tile shapes that suit Hopper (H100/H200)
or Ampere (A100); the best configuration is cached per key by Triton's autotuner, the key
including a power-of-two bucket of the token count. Under ``TRITON_INTERPRET=1`` (CPU tests)
one small configuration is used, since every program is simulated with numpy.

``GRADSAE_AUTOTUNE`` caps every autotune list in ``gradsae.kernels``: ``full`` (default) the
whole list, ``small`` its first two entries (a GPU check that must fit a time budget),
``off`` the first entry alone (no tuning runs).

Every listed configuration compiles for sm_90 without register spills and within the
shared memory of a block (``tests/test_aot_sm90.py`` compiles the defaults ahead of time;
``scripts/ptxas_report.py`` records all of them in ``bench/results/ptxas-sm90-triton.json``).
"""

from __future__ import annotations

import os

import torch
import triton

# Widest d_sae tile any configuration uses; d_sae splits are multiples of it so the split
# layout does not depend on the configuration the autotuner picks.
SPLIT_GRANULE = 256
# Hopper's opt-in shared memory per block (H100/H200), the budget configurations are pruned to.
SMEM_PER_BLOCK = 227 * 1024
LEVELS = ("full", "small", "off")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def n_bucket(n: int) -> int:
    """The token-count bucket in the autotune keys: a power of two in [64, 65536]."""
    return min(1 << 16, max(64, next_pow2(n)))


def autotune_level() -> str:
    """``GRADSAE_AUTOTUNE``: full (default), small or off."""
    level = os.environ.get("GRADSAE_AUTOTUNE", "full").strip().lower() or "full"
    if level not in LEVELS:
        raise ValueError(f"GRADSAE_AUTOTUNE={level!r}: expected one of {', '.join(LEVELS)}")
    return level


def cap_list(configs: list) -> list:
    """An autotune list as ``GRADSAE_AUTOTUNE`` allows it."""
    level = autotune_level()
    if level == "small":
        return configs[:2]
    if level == "off":
        return configs[:1]
    return configs


def _cfg(bm, bn, bk, stages, warps):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=stages, num_warps=warps)


# (BM, BN, BK, stages, warps), best guesses first (GRADSAE_AUTOTUNE=small keeps two). Every
# entry compiles for sm_90 without spills (bf16, KP <= 128; scripts/ptxas_report.py). The
# top-k epilogue holds the fp32 tile, a hit mask and its int32 prefix sum while the running
# keys wait in memory; the threshold epilogue also reserves slots with an atomic per row,
# which leaves room for 64-column tiles only. Every BN divides SPLIT_GRANULE.
_HOPPER_TOPK = [
    (64, 128, 64, 4, 8),
    (64, 128, 64, 3, 8),
    (64, 64, 64, 4, 8),
    (64, 128, 32, 4, 8),
    (32, 128, 64, 4, 4),
    (32, 256, 64, 3, 8),   # the only tiles wide enough for k > 128 (KP=256 spills here: its
                           # [32, 256] int64 merge network; the chunked strategy serves it)
]
_HOPPER_THRESHOLD = [
    (64, 64, 64, 4, 8),
    (64, 64, 128, 3, 8),
    (32, 64, 64, 4, 4),
]
_AMPERE_TOPK = [
    (64, 128, 32, 4, 8),
    (64, 64, 64, 4, 8),
    (32, 128, 32, 4, 4),
    (32, 256, 32, 3, 8),
]
_AMPERE_THRESHOLD = [
    (64, 64, 32, 4, 8),
    (32, 64, 64, 4, 4),
]
# fp32 inputs (exact products by default, torch's allow_tf32 off: no tensor cores) take
# their own short lists: BK 32, three stages, 64-row tiles (the others spill).
_FP32_TOPK = [
    (64, 128, 32, 3, 8),
    (64, 64, 32, 3, 8),
]
_FP32_THRESHOLD = [
    (64, 64, 32, 3, 8),
    (64, 64, 32, 4, 8),
]
_TABLES = {("topk", True): _HOPPER_TOPK, ("threshold", True): _HOPPER_THRESHOLD,
           ("topk", False): _AMPERE_TOPK, ("threshold", False): _AMPERE_THRESHOLD}
_FP32 = {"topk": _FP32_TOPK, "threshold": _FP32_THRESHOLD}


def hopper_table(kind: str = "topk") -> list[tuple]:
    return list(_TABLES[(kind, True)])


def autotune_configs(kind: str = "topk") -> list:
    """Autotune candidates of the fused encode kernel ``kind`` (topk, threshold) on the
    current CUDA device, capped by ``GRADSAE_AUTOTUNE``."""
    if interpreting() or not torch.cuda.is_available():
        return [_cfg(16, 32, 16, 1, 1)]
    major, _ = torch.cuda.get_device_capability()
    return cap_list([_cfg(*c) for c in _TABLES[(kind, major >= 9)]])


def smem_estimate(bm: int, bn: int, bk: int, stages: int, kp: int, elem_bytes: int = 2) -> int:
    """Shared memory of one program of the fused kernels: the pipelined A and B tiles
    (``stages`` deep), or the epilogue's layout conversions where larger (an int64
    [BM, max(KP, 64)] key block, an int32 [BM, BN] prefix sum)."""
    mainloop = stages * (bm * bk + bk * bn) * elem_bytes
    epilogue = max(bm * max(kp, 64) * 8, bm * bn * 4)
    return max(mainloop, epilogue)


def fits(bm: int, bn: int, bk: int, stages: int, kp: int, elem_bytes: int = 2) -> bool:
    """Whether a configuration can launch at all: its tile holds the top-k (BN >= KP) and its
    shared memory fits a block."""
    return bn >= kp and smem_estimate(bm, bn, bk, stages, kp, elem_bytes) <= SMEM_PER_BLOCK


def table_for(kind: str, elem_bytes: int, hopper: bool = True) -> list[tuple]:
    """The candidate list of the fused ``kind`` for inputs of ``elem_bytes`` bytes."""
    if elem_bytes >= 4:
        return list(_FP32[kind])
    return list(_TABLES[(kind, hopper)])


def prune_encode_configs(configs, named_args, **kwargs):
    """The candidates for the input's width (fp32 inputs take their own list, capped like
    the rest), without those that can never launch (BN < KP, or more shared memory than a
    block has); if none is left, the narrowest one widened to KP with a shallow pipeline."""
    kind = "threshold" if "THR" in named_args else "topk"
    kp = named_args.get("KP", kwargs.get("KP", 1))
    x = named_args.get("X")
    elem = x.element_size() if hasattr(x, "element_size") else 2
    if elem >= 4:
        configs = cap_list([_cfg(*c) for c in _FP32[kind]])
    kept = [c for c in configs
            if fits(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, kp, elem)]
    if kept:
        return kept
    base = min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])
    kw = dict(base.kwargs)
    kw["BN"] = max(kw["BN"], next_pow2(kp))
    kw["BM"] = min(kw["BM"], 32)
    return [triton.Config(kw, num_stages=2, num_warps=base.num_warps)]


def default_encode_configs(kind: str, kp: int = 1, dtype: str = "bfloat16") -> list[tuple]:
    """The (BM, BN, BK, stages, warps) a Hopper GPU runs by default for the fused ``kind``
    (topk with KP=``kp``, threshold): the fixed configuration and the autotune list under
    GRADSAE_AUTOTUNE=small, pruned as at launch. What the ahead-of-time test compiles."""
    elem = 4 if dtype == "float32" else 2
    meta, warps, stages = _gpu_fixed(kind, kp, major=9, elem_bytes=elem)
    out = [(meta["BM"], meta["BN"], meta["BK"], stages, warps)]
    kept = [c for c in table_for(kind, elem) if fits(c[0], c[1], c[2], c[3], kp, elem)]
    for c in kept[:2]:
        if c not in out:
            out.append(c)
    return out


def interpreter_config(kp: int, cols: int, n: int) -> dict:
    """The tile shape used under the interpreter: few, wide tiles (numpy is fast per element
    and slow per operation), at least KP wide, at most 8192 (``cols`` = columns of d_sae),
    and no more rows than there are tokens (``n``)."""
    return {"BM": min(32, next_pow2(max(n, 2))), "BN": max(64, next_pow2(kp), min(8192, next_pow2(cols) // 2)), "BK": 32}


def _gpu_fixed(kind: str, kp: int, major: int, elem_bytes: int = 2) -> tuple[dict, int, int]:
    wide = elem_bytes >= 4 or major < 9  # fp32, or Ampere: BK 32
    if kind == "threshold":
        bm, bn, bk, stages = 64, 64, 32 if wide else 64, 3 if wide else 4
    else:
        bn = max(128, next_pow2(kp))
        bm, bk, stages = (64 if bn <= 128 else 32), 32 if wide else 64, 3
    return {"BM": bm, "BN": bn, "BK": bk}, 8, stages


def fixed_config(kp: int, cols: int, n: int, kind: str = "topk",
                 elem_bytes: int = 2) -> tuple[dict, int, int]:
    """A fixed (not autotuned) configuration: meta-parameters, num_warps, num_stages.
    Used for deterministic runs so the accumulation order never depends on a tuning race,
    and under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return interpreter_config(kp, cols, n), 1, 1
    major, _ = torch.cuda.get_device_capability()
    return _gpu_fixed(kind, kp, major, elem_bytes)


def num_sms() -> int:
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
