"""Benchmark of the influence op against the dense PyTorch anchor and the bare encode GEMM.

    gradsae bench                              # the CPU shape: T=2048 d_in=768 d_sae=32768 k=64 fp32
    gradsae bench --T 512 --repeat 3           # smaller/faster
    python bench/run.py ...                    # the same, from a checkout

The variants, run in one go:
- ``gradsae``: ``gradsae.influence`` (the op under test, ``--backend``);
- ``dense``: the dense anchor people write today: dense pre-activations, dense top-k latents,
  the dense gradient ``grad @ W_dec.T``, the product;
- ``gemm``: the bare encode GEMM ``(x - b_dec) @ W_enc + b_enc`` — the unavoidable work.

Each variant runs in a fresh subprocess so its peak memory is its own: the peak resident set
above the baseline taken after the inputs exist (CPU), or torch.cuda.max_memory_allocated
above the inputs (GPU). Memory is read on the first full-size run (after a one-row warm-up that does the lazy imports);
time is the median of ``--repeat`` further runs. Results are
printed as a table and written to bench/results/<device>.json (merged with earlier entries).
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

import torch

import gradsae

def make_inputs(T: int, d_in: int, d_sae: int, k: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    sae = gradsae.SAE(r(d_in, d_sae) / d_in**0.5, r(d_sae) * 0.1, r(d_sae, d_in) / d_in**0.5, r(d_in) * 0.1,
                      "topk", k=k)
    return sae, r(T, d_in), r(T, d_in)


def run_gradsae(sae, x, grad, backend="auto"):
    return gradsae.influence(x, grad, sae, backend=backend, check_finite=False)


def run_dense(sae, x, grad):
    pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    dz = grad @ sae.W_dec.T
    return z * dz


def run_gemm(sae, x, grad):
    return torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)


VARIANTS = {"gradsae": run_gradsae, "dense": run_dense, "gemm": run_gemm}


RESULTS = Path.cwd() / "bench" / "results"


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak); 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeat: int, cuda: bool):
    """``(peak, times, result)``: the peak extra memory of the first call of ``fn()`` (bytes
    above what was allocated or resident before it), the wall times of ``repeat`` further
    calls, and the first call's result."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_kib("VmRSS") * 1024
    result = fn()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kib("VmHWM") * 1024 - base
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return peak, times, result


def _child(args) -> dict:
    import torch

    dtype = getattr(torch, args.dtype)
    sae, x, grad = make_inputs(args.T, args.d_in, args.d_sae, args.k, dtype=dtype, device=args.device)
    fn = VARIANTS[args.variant]
    kw = {"backend": args.backend} if args.variant == "gradsae" else {}
    # Warm up on one row: lazy imports and backend registration happen here, but no large
    # allocation, so the first full-size run below shows the op's own peak (the C allocator
    # would keep a full-size warm-up's blocks resident and hide it).
    fn(sae, x[:1], grad[:1], **kw)
    peak, times, _ = measure(lambda: fn(sae, x, grad, **kw), args.repeat, args.device.startswith("cuda"))
    return {"variant": args.variant, "time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak}


def run_child(prefix: list[str], variant: str, args, keys, extra: list[str] = ()) -> dict | None:
    """Run one variant in a fresh process (``prefix --child 1 --variant V`` plus ``args``'
    ``keys`` as flags) and return the JSON dict it prints last; None (with its stderr shown)
    if it failed."""
    cmd = list(prefix) + ["--child", "1", "--variant", variant, *extra] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in keys
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        print(f"bench: the {variant} run failed (exit {res.returncode})", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


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


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048, help="tokens (rows of x and grad) (default 2048)")
    p.add_argument("--d-in", dest="d_in", type=int, default=768, help="SAE input width (default 768)")
    p.add_argument("--d-sae", dest="d_sae", type=int, default=32768, help="SAE latents (default 32768)")
    p.add_argument("--k", type=int, default=64, help="TopK SAE's k (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the SAE and inputs (default float32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda, cuda:N")
    p.add_argument("--backend", default="reference",
                   help="gradsae backend to measure (default reference; see `gradsae info`)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per variant; the median is reported (default 5)")
    p.add_argument("--out", default=None, help="results file (default bench/results/<device>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    return p


def run(args) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`build_parser`)."""

    if args.child:
        print(json.dumps(_child(args)))
        return 0

    rows = {}
    keys = ("T", "d_in", "d_sae", "k", "dtype", "device", "backend", "repeat")
    for variant in ("gemm", "gradsae", "dense"):
        row = run_child([sys.executable, "-m", "gradsae.benchmark"], variant, args, keys)
        if row is None:
            return 1
        rows[variant] = row

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

    out = Path(args.out) if args.out else RESULTS / f"{slug(dev)}.json"
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


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
