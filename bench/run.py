"""Benchmark the influence op against the dense anchor and the bare encode GEMM, in one run.

    python bench/run.py                       # the issue's CPU shape: T=2048 d_in=768 d_sae=32768 k=64 fp32
    python bench/run.py --T 512 --repeat 3    # smaller/faster

Each variant runs in a fresh subprocess so its peak memory is its own: the peak resident set
above the baseline taken after the inputs exist (CPU), or torch.cuda.max_memory_allocated
above the inputs (GPU). Time is the median of ``--repeat`` runs after one warm-up. Results are
printed as a table and written to bench/results/<device>.json (merged with earlier entries of
other shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from influence_cases import VARIANTS, make_inputs

    dtype = getattr(torch, args.dtype)
    sae, x, grad = make_inputs(args.T, args.d_in, args.d_sae, args.k, dtype=dtype, device=args.device)
    fn = VARIANTS[args.variant]
    kw = {"backend": args.backend} if args.variant == "gradsae" else {}
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    fn(sae, x, grad, **kw)  # warm-up run doubles as the peak-memory run
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    times = []
    for _ in range(args.repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(sae, x, grad, **kw)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--d-in", dest="d_in", type=int, default=768)
    p.add_argument("--d-sae", dest="d_sae", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", help="gradsae backend to measure")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None, help="results file (default bench/results/<device>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(_child(args)))
        return 0

    rows = {}
    for variant in ("gemm", "gradsae", "dense"):
        cmd = [sys.executable, __file__, "--child", "1", "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("T", "d_in", "d_sae", "k", "dtype", "device", "backend", "repeat")
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            print(f"bench: the {variant} run failed (exit {res.returncode})", file=sys.stderr)
            return 1
        rows[variant] = json.loads(res.stdout.strip().splitlines()[-1])

    g, d, m = rows["gradsae"], rows["dense"], rows["gemm"]
    summary = {
        "speedup_vs_dense": d["time_s"] / g["time_s"],
        "time_vs_gemm": g["time_s"] / m["time_s"],
        "memory_vs_dense": g["peak_extra_bytes"] / max(1, d["peak_extra_bytes"]),
    }
    dev = device_name(args.device)
    shape = f"T={args.T} d_in={args.d_in} d_sae={args.d_sae} k={args.k} {args.dtype}"
    print(f"influence benchmark on {dev}: {shape}, backend={args.backend}")
    print(f"{'variant':10s} {'median s':>10s} {'tokens/s':>12s} {'peak extra MiB':>15s}")
    for name, r in (("gradsae", g), ("dense", d), ("gemm", m)):
        print(f"{name:10s} {r['time_s']:10.4f} {args.T / r['time_s']:12.0f} {r['peak_extra_bytes'] / 2**20:15.1f}")
    print(
        f"gradsae is {summary['speedup_vs_dense']:.2f}x faster than dense (target >= 1.5x), "
        f"{summary['time_vs_gemm']:.2f}x the bare GEMM time (target <= 1.3x), "
        f"{summary['memory_vs_dense']:.3f} of dense peak memory (target <= 0.125)"
    )

    import torch

    out = Path(args.out) if args.out else HERE / "results" / f"{slug(dev)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(out.read_text()) if out.exists() else {"device": dev, "runs": {}}
    table["runs"][f"{shape} backend={args.backend}"] = {
        "shape": {"T": args.T, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "dtype": args.dtype},
        "backend": args.backend, "repeat": args.repeat, "variants": rows, "summary": summary,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
