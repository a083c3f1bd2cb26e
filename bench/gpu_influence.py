"""GPU benchmark of the influence op: every accelerated backend against the dense PyTorch
anchor and the bare encode GEMM, measured in one run on one device.

    python bench/gpu_influence.py                 # issue shape + the d_sae / d_in sweep
    python bench/gpu_influence.py --no-sweep      # T=8192 d_in=2304 d_sae=131072 k=64 bf16 only
    python bench/gpu_influence.py --T 4096 --d-sae 65536 --reps 5

For each shape it times (median of CUDA-event timings after warm-up, so autotuning is
excluded):
- ``triton`` / ``cuda``: ``gradsae.influence(x, grad, sae, backend=name)`` for each registered
  accelerated backend that can serve the input;
- ``dense``: the anchor people write today (dense pre-activations, torch.topk, dense gradient
  ``grad @ W_dec.T``, the product; gradsae.benchmark.run_dense);
- ``gemm``: the bare encode GEMM ``torch.matmul(x, W_enc)`` (cuBLAS), the unavoidable work.

and reports time, throughput (tokens/s), the ratio of each backend's throughput to the
anchor's and to the GEMM's (targets: >= 3x the anchor, >= 0.6 of the GEMM), and the peak
extra memory (``torch.cuda.max_memory_allocated`` during the call minus what was allocated
before it: inputs and weights excluded). A variant that runs out of memory is recorded as
such. The table is printed and written to ``bench/results/<device>-influence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import gradsae
from gradsae.backends import Request, get_backend
from gradsae.benchmark import make_inputs, run_dense

HERE = Path(__file__).resolve().parent

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ACCELERATED = ("triton", "cuda")
SWEEP_D_SAE = (16384, 65536, 131072, 262144, 1048576)
SWEEP_D_IN = (768, 2304, 4096)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure(fn, reps: int, warmup: int = 2) -> dict:
    """Median milliseconds and peak extra bytes of ``fn()``; ``{"error": ...}`` on OOM."""
    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return {"ms": statistics.median(times), "peak_extra_bytes": int(peak)}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}


def backends_for(sae, x, grad) -> dict[str, str | None]:
    """Accelerated backends registered in this build: None if it serves, else why not."""
    out = {}
    for name in ACCELERATED:
        if name not in gradsae.available_backends():
            continue
        req = Request(x, grad, sae, sae.k, explicit=True)
        out[name] = get_backend(name).unsupported(req)
    return out


def run_case(T: int, d_in: int, d_sae: int, k: int, dtype: torch.dtype, reps: int) -> dict:
    sae, x, grad = make_inputs(T, d_in, d_sae, k, dtype=dtype, device="cuda")
    row = {"T": T, "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": str(dtype).replace("torch.", ""),
           "variants": {}}
    var = row["variants"]
    var["gemm"] = measure(lambda: torch.matmul(x, sae.W_enc), reps)
    var["dense"] = measure(lambda: run_dense(sae, x, grad), reps)
    for name, why in backends_for(sae, x, grad).items():
        if why is not None:
            var[name] = {"error": f"cannot serve: {why}"}
            continue
        var[name] = measure(lambda n=name: gradsae.influence(x, grad, sae, backend=n, check_finite=False), reps)
    gemm_ms = var["gemm"].get("ms")
    dense_ms = var["dense"].get("ms")
    for name, r in var.items():
        if "ms" not in r:
            continue
        r["tokens_per_s"] = T / (r["ms"] / 1e3)
        r["vs_dense"] = dense_ms / r["ms"] if dense_ms else None
        r["vs_gemm"] = gemm_ms / r["ms"] if gemm_ms else None
        # extra memory per token and slot: O(T x k) means this stays flat as d_sae grows
        r["extra_bytes_per_token_slot"] = r["peak_extra_bytes"] / (T * k)
    del sae, x, grad
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = f"{'T':>6} {'d_in':>5} {'d_sae':>8} {'k':>4} {'variant':>8} {'ms':>9} {'tok/s':>11} {'x dense':>8} {'of gemm':>8} {'extra MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for name, v in r["variants"].items():
            pre = f"{r['T']:>6} {r['d_in']:>5} {r['d_sae']:>8} {r['k']:>4} {name:>8}"
            if "ms" not in v:
                lines.append(f"{pre} {v['error']}")
                continue
            vd = f"{v['vs_dense']:.2f}" if v["vs_dense"] else "-"
            vg = f"{v['vs_gemm']:.2f}" if v["vs_gemm"] else "-"
            lines.append(f"{pre} {v['ms']:>9.3f} {v['tokens_per_s']:>11.3e} {vd:>8} {vg:>8} "
                         f"{v['peak_extra_bytes'] / 2**20:>10.1f}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Atomic write: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-sweep", action="store_true", help="only the main shape")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>-influence.json)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/gpu_influence.py: no CUDA GPU is available; this benchmark measures GPU kernels "
              "and has nothing to measure here (nothing written).", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    shapes = [(args.T, args.d_in, args.d_sae, args.k)]
    if not args.no_sweep:
        shapes += [(args.T, args.d_in, s, args.k) for s in SWEEP_D_SAE if s != args.d_sae]
        shapes += [(args.T, d, args.d_sae, args.k) for d in SWEEP_D_IN if d != args.d_in]
    device = torch.cuda.get_device_name()
    rows = []
    for shape in tqdm(shapes, desc="shapes", unit="shape"):
        rows.append(run_case(*shape, dtype, args.reps))
    import triton

    payload = {
        "device": device,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "backends": {n: get_backend(n).describe() for n in ACCELERATED if n in gradsae.available_backends()
                     and hasattr(get_backend(n), "describe")},
        "targets": {"vs_dense": 3.0, "vs_gemm": 0.6},
        "rows": rows,
    }
    out = args.out or HERE / "results" / f"{slug(device)}-influence.json"
    write_json(out, payload)
    print(f"device: {device}")
    print(table(rows))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
