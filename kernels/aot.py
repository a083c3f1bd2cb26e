"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here (sm_90, Hopper),
and the ptxas resource report of each: registers, spills, stack frame, shared memory.

    from gradsae.kernels import aot, stream_select
    cfg = stream_select.stream_config(64, 8192, 16384, gpu=True)
    spec = stream_select.aot_spec_topk(cfg, 64, "*bf16")   # each kernel module describes its own
    rec = aot.compile_spec(spec)      # {"registers": .., "spill_stores": .., "shared": .., ...}

Triton compiles to PTX for the target without a driver; the PTX goes through the ``ptxas``
Triton ships (``-v``) for the register and spill figures, and the shared memory comes from the
compiled kernel's metadata. Arguments are specialised the way Triton's launcher specialises
them at the target shape (T=8192, d_in=2304, d_sae=131072, k=64: pointers 16-byte aligned,
the integers named in each spec divisible by 16), so the code is the one the GPU would run.

This module imports no kernel module (they import :class:`Spec` from it);
``scripts/ptxas_report.py`` lists the configurations (``--defaults``: the ones a GPU run uses
by default, every fixed launch configuration and the autotune candidates kept under
``GRADSAE_AUTOTUNE=small``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import triton

# Hopper's opt-in shared memory per block (H100/H200): 227 KB.
SMEM_LIMIT = 227 * 1024
TARGET = ("cuda", 90, 32)


@dataclass
class Spec:
    """One kernel in one configuration: ``signature`` maps every argument to a Triton type
    (``*bf16``, ``i32``, ..., or ``constexpr``), ``constexprs`` gives the constexpr values,
    ``divisible`` names the integer arguments specialised as multiples of 16."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()
    meta: dict = field(default_factory=dict)  # what the record reports (config, dtype, ...)


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _attrs(spec: Spec) -> dict:
    names = list(spec.fn.arg_names)
    out = {}
    for i, n in enumerate(names):
        t = spec.signature[n]
        if (t.startswith("*") or n in spec.divisible) and t != "constexpr":
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def parse_ptxas(text: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (one entry function)."""
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not frame:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return {"registers": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def compile_spec(spec: Spec, arch: str = "sm_90a") -> dict:
    """Compile ``spec`` for sm_90 and return its record (the spec's meta, the resources, the
    compile time, and a few PTX facts: wgmma / cp.async / 16-byte loads used)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec))
    k = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": spec.num_warps,
                                                                "num_stages": spec.num_stages})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.name}:\n{res.stderr[-2000:]}")
    rec = {"kernel": spec.name, **spec.meta, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
           "shared": int(k.metadata.shared), **parse_ptxas(res.stderr),
           "wgmma": "wgmma.mma_async" in ptx, "cp_async": "cp.async" in ptx,
           "ld_v4": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
           "compile_s": round(time.perf_counter() - t0, 1)}
    return rec


def problems(rec: dict) -> list[str]:
    """What is wrong with a record: spills, a stack frame, or shared memory above the limit."""
    out = []
    if rec["spill_stores"] or rec["spill_loads"]:
        out.append(f"spills {rec['spill_stores']} B stores / {rec['spill_loads']} B loads")
    if rec["stack"]:
        out.append(f"{rec['stack']} B stack frame")
    if rec["shared"] > SMEM_LIMIT:
        out.append(f"{rec['shared']} B shared memory > {SMEM_LIMIT}")
    return out


def _ptr(dtype: str) -> str:
    return "*" + {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
