"""Stage timings of the ``cuda`` backend's kernels, to see where its time goes (the
side-by-side comparison of backends with the dense anchor is bench/gpu_influence.py).

    python bench/cuda_kernels.py [--T 8192 --d-in 2304 --d-sae 131072 --k 64 --dtype bfloat16]

Stages, each the median of CUDA-event timings (bench/gpu_influence.measure):
- ``gemm``: ``torch.addmm`` of the encode (cuBLAS), the unavoidable work;
- ``select``: fused encode GEMM + top-k epilogue + split merge (``encode_sparse``);
- ``gather``: the gather-dot of a known active set (``influence_at``);
- ``influence``: the whole op; ``accumulate``: the op with the fused LatentStats update.
``select`` / ``gemm`` is the epilogue's and the GEMM's overhead over cuBLAS. Writes
``bench/results/cuda_kernels-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_influence import DTYPES, measure, slug  # noqa: E402
from influence_cases import make_inputs, run_gemm  # noqa: E402

import gradsae  # noqa: E402
from gradsae.backends import Request, get_backend  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/cuda_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sae, x, grad = make_inputs(args.T, args.d_in, args.d_sae, args.k, dtype=DTYPES[args.dtype], device="cuda")
    cuda = get_backend("cuda")
    why = cuda.unsupported(Request(x, grad, sae, args.k))
    if why:
        print(f"the cuda backend cannot serve this input: {why}", file=sys.stderr)
        return 2
    idx, acts = gradsae.encode_sparse(x, sae, backend="cuda", check_finite=False)
    stages = {
        "gemm": lambda: run_gemm(sae, x, grad),
        "select": lambda: gradsae.encode_sparse(x, sae, backend="cuda", check_finite=False),
        "gather": lambda: gradsae.influence_at(idx, acts, grad, sae, backend="cuda"),
        "influence": lambda: gradsae.influence(x, grad, sae, backend="cuda", check_finite=False),
        "accumulate": lambda: gradsae.accumulate_influence(x, grad, sae, backend="cuda", check_finite=False),
    }
    res = {
        "device": torch.cuda.get_device_name(),
        "shape": {"T": args.T, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "dtype": args.dtype},
        "backend": cuda.describe(),
        "stages": {name: measure(fn, args.reps) for name, fn in tqdm(stages.items(), desc="stages", unit="stage")},
    }
    ms = {n: r.get("ms") for n, r in res["stages"].items()}
    if ms["gemm"] and ms["select"]:
        res["select_over_gemm"] = ms["select"] / ms["gemm"]
        res["gemm_tflops"] = 2.0 * args.T * args.d_in * args.d_sae / (ms["gemm"] * 1e9)
        res["select_tflops"] = 2.0 * args.T * args.d_in * args.d_sae / (ms["select"] * 1e9)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cuda_kernels-{slug(res['device'])}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
