"""Kernel-level timings of the ``cuda`` backend against the bare cuBLAS GEMM and the dense
anchor, at the issue's target shape by default (T=8192, d_in=2304, d_sae=131072, k=64, bf16).

    python bench/cuda_kernels.py [--T 8192 --d-in 2304 --d-sae 131072 --k 64 --dtype bfloat16]

Reports milliseconds (median of CUDA-event timings) for
- ``gemm``: ``torch.addmm`` of the encode, the unavoidable work (cuBLAS);
- ``dense``: the dense PyTorch anchor (dense pre-activations, top-k, dense gradient, product);
- ``select``: the fused encode + selection kernels (``encode_sparse``);
- ``influence``: the whole op on the ``cuda`` backend (and on ``triton`` when it serves);
and the ratios the targets are stated in (speed-up over dense, share of the GEMM's
throughput). Writes ``bench/results/cuda_kernels-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from influence_cases import make_inputs, run_dense, run_gemm  # noqa: E402

import gradsae  # noqa: E402
from gradsae.backends import Request, get_backend  # noqa: E402


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/cuda_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    sae, x, grad = make_inputs(args.T, args.d_in, args.d_sae, args.k, dtype=dtype, device="cuda")
    cuda = get_backend("cuda")
    why = cuda.unsupported(Request(x, grad, sae, args.k))
    if why:
        print(f"the cuda backend cannot serve this shape: {why}", file=sys.stderr)
        return 2
    cases = {
        "gemm": lambda: run_gemm(sae, x, grad),
        "dense": lambda: run_dense(sae, x, grad),
        "select": lambda: gradsae.encode_sparse(x, sae, backend="cuda", check_finite=False),
        "influence[cuda]": lambda: gradsae.influence(x, grad, sae, backend="cuda", check_finite=False),
    }
    if "triton" in gradsae.available_backends() and get_backend("triton").unsupported(Request(x, grad, sae, args.k)) is None:
        cases["influence[triton]"] = lambda: gradsae.influence(x, grad, sae, backend="triton", check_finite=False)
    ms = {}
    for name, fn in tqdm(cases.items(), desc="timing", unit="case"):
        try:
            ms[name] = time_ms(fn, reps=args.reps)
        except torch.cuda.OutOfMemoryError as e:  # the dense anchor may not fit
            ms[name] = None
            print(f"{name}: out of memory ({e})", file=sys.stderr)
        torch.cuda.empty_cache()
    flops = 2.0 * args.T * args.d_in * args.d_sae
    res = {
        "device": torch.cuda.get_device_name(0),
        "shape": {"T": args.T, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "dtype": args.dtype},
        "ms": ms,
        "gemm_tflops": flops / (ms["gemm"] * 1e9) if ms.get("gemm") else None,
        "backend": cuda.describe(),
    }
    for name in [n for n in ms if n.startswith("influence")]:
        if ms[name]:
            res[f"{name} speedup_vs_dense"] = ms["dense"] / ms[name] if ms.get("dense") else None
            res[f"{name} gemm_throughput_share"] = ms["gemm"] / ms[name]
    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", res["device"]).strip("-").lower()
    path = os.path.join(args.out, f"cuda_kernels-{tag}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, path)
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
