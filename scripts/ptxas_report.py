"""Compile the Triton kernels ahead of time for sm_90 (Hopper) and record what ptxas reports.

    python scripts/ptxas_report.py                       # every listed configuration, KP 64
    python scripts/ptxas_report.py --kp 64 256 --out bench/results/ptxas-sm90-triton.json
    python scripts/ptxas_report.py --defaults            # only what a GPU run uses by default

No GPU is needed (gradsae.kernels.aot). Each record: kernel, configuration, registers, spill
bytes, stack frame, shared memory, whether wgmma / cp.async are used, compile seconds, and the
problems found (spills, a stack frame, shared memory above 227 KB). The JSON also keeps the
records of an earlier run given with --before (the kernels as they were before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import triton

import importlib

from gradsae.kernels import aot, encode_select, stream_select, tuning

# (the package exports a function of the same name as this module)
gather_dot = importlib.import_module("gradsae.kernels.gather_dot")


def all_specs(kps, dtypes) -> list:
    specs = []
    for dtype in dtypes:
        p = aot._ptr(dtype)
        for kp in kps:
            elem = 4 if dtype == "float32" else 2
            for cfg in tuning.table_for("topk", elem):
                if tuning.fits(*cfg[:4], kp, elem):
                    specs.append(encode_select.aot_spec_topk(cfg, kp, p))
            specs.append(stream_select.aot_spec_topk(stream_select.stream_config(kp, 8192, 16384, gpu=True), kp, p))
        for cfg in tuning.table_for("threshold", 4 if dtype == "float32" else 2):
            specs.append(encode_select.aot_spec_threshold(cfg, p))
        specs.append(stream_select.aot_spec_threshold(stream_select.stream_config(1, 8192, 16384, gpu=True), p))
        specs.append(gather_dot.aot_spec(p))
    return specs


def default_specs(dtypes=("bfloat16",), kps=(64,)) -> list:
    """Every default configuration of the kernels a GPU run uses: the fixed launch
    configurations and the autotune candidates kept under GRADSAE_AUTOTUNE=small."""
    specs = []
    for dtype in dtypes:
        p = aot._ptr(dtype)
        for kp in kps:
            for cfg in tuning.default_encode_configs("topk", kp, dtype):
                specs.append(encode_select.aot_spec_topk(cfg, kp, p))
            cfg = stream_select.stream_config(kp, 8192, 16384, gpu=True)
            specs.append(stream_select.aot_spec_topk(cfg, kp, p))
        for cfg in tuning.default_encode_configs("threshold", 1, dtype):
            specs.append(encode_select.aot_spec_threshold(cfg, p))
        cfg = stream_select.stream_config(1, 8192, 16384, gpu=True)
        specs.append(stream_select.aot_spec_threshold(cfg, p))
        specs.append(gather_dot.aot_spec(p))
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kp", type=int, nargs="+", default=[64])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"])
    ap.add_argument("--defaults", action="store_true", help="only the default configurations")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--before", default=None, help="a JSON of an earlier run to keep beside these records")
    args = ap.parse_args(argv)
    specs = default_specs(tuple(args.dtype), tuple(args.kp)) if args.defaults else all_specs(args.kp, args.dtype)
    records = []
    t0 = time.perf_counter()
    for spec in specs:
        try:
            rec = aot.compile_spec(spec)
            rec["problems"] = aot.problems(rec)
        except Exception as e:  # a configuration that does not compile is a finding too
            rec = {"kernel": spec.name, **spec.meta, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                   "error": f"{type(e).__name__}: {str(e)[-500:]}", "problems": ["does not compile"]}
        records.append(rec)
        cfg = " ".join(f"{k}={v}" for k, v in rec.items() if k in ("KP", "BM", "BN", "BK", "BS", "BD"))
        print(f"{rec['kernel']:17} {cfg:32} w={rec['num_warps']} s={rec['num_stages']} "
              f"regs={rec.get('registers', '-'):>3} spill={rec.get('spill_stores', '-'):>5} "
              f"smem={rec.get('shared', '-'):>7} {'; '.join(rec['problems']) or 'ok'}", flush=True)
    payload = {"target": "sm_90a", "triton": triton.__version__, "smem_limit": aot.SMEM_LIMIT,
               "seconds": round(time.perf_counter() - t0, 1), "records": records}
    if args.before:
        with open(args.before) as f:
            payload["before"] = json.load(f)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(f"written: {args.out}")
    return 1 if any(r["problems"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
