"""Benchmark of the encode strategies at one shape: the fused kernels (GEMM with the selection
in its epilogue) against the chunked strategy (vendor GEMM per chunk + streaming selection),
the dense PyTorch anchor and the bare cuBLAS GEMM, on one device in one process.

    python bench/strategies.py                        # T=8192 d_in=2304 d_sae=131072 k=64 bf16
    python bench/strategies.py --json out.json --reps 20
    python bench/strategies.py --cpu-smoke            # tiny shape, CPU, Triton interpreter

Variants (each the median of ``--reps`` timed runs after warm-up; compilation and autotuning
happen in the warm-up):
- ``gemm``: ``torch.matmul(x, W_enc)``, the bare encode GEMM (the unavoidable work);
- ``dense``: the dense anchor (dense pre-activations, torch.topk, dense gradient, product);
- ``<backend>.fused`` / ``<backend>.chunked``: the backend's influence (selection + gather-dot)
  with that encode strategy forced; ``.select``: the selection alone; ``chunked.f32``: the
  chunk written in fp32 instead of the inputs' bf16; ``chunked.select@BM,BN,W``: the Triton
  fold in another launch configuration;
- ``<backend>.auto``: ``gradsae.influence`` as a user calls it: the strategy the op measured
  for this bucket on this GPU (its first warm-up run measures; the decisions are reported
  under ``strategy`` in the JSON).
and reports milliseconds, tokens/s, the ratio to the GEMM's time (goal: the op >= 0.8 of the
GEMM's throughput) and to the dense anchor's (goal >= 3x), and the peak extra memory (above
inputs and weights). A variant that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

import gradsae
from gradsae.benchmark import make_inputs, run_dense

STREAM_SWEEP = ("1,512,4", "2,512,4", "1,2048,8")


def variants(sae, x, grad, cuda_ext: bool, sweep=STREAM_SWEEP) -> dict:
    """name -> a zero-argument callable, or ``(environment, callable)`` for one that runs
    with those environment variables set."""
    from gradsae.backends import Request, get_backend

    out = {
        "gemm": lambda: torch.matmul(x, sae.W_enc),
        "dense": lambda: run_dense(sae, x, grad),
    }

    def forced(backend, strategy, full=True):
        b = get_backend(backend)
        req = Request(x, grad if full else None, sae, sae.k, explicit=True, strategy=strategy)
        return (lambda: b.influence(req)) if full else (lambda: b.select(req))

    for backend in ("triton", "cuda") if cuda_ext else ("triton",):
        for strat in ("fused", "chunked"):
            out[f"{backend}.{strat}.select"] = forced(backend, strat, full=False)
            out[f"{backend}.{strat}"] = forced(backend, strat)
        out[f"{backend}.chunked.f32.select"] = ({"GRADSAE_CHUNK_DTYPE": "float32"},
                                                forced(backend, "chunked", full=False))
        # the op as a user calls it: the strategy measured on this GPU for this bucket
        out[f"{backend}.auto"] = lambda b=backend: gradsae.influence(x, grad, sae, backend=b, check_finite=False)
    for cfg in sweep:
        out[f"triton.chunked.select@{cfg}"] = ({"GRADSAE_STREAM_CONFIG": cfg},
                                                forced("triton", "chunked", full=False))
    return out


def measure(fn, reps: int, warmup: int, cuda: bool) -> dict:
    """Median milliseconds of ``reps`` runs after ``warmup`` (CUDA events on a GPU) and the
    peak extra bytes of one run."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del res
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
    else:
        peak = 0
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "ms_all": times, "peak_extra_bytes": int(peak),
            "warmup_s": round(warm_s, 2)}


def run(T, d_in, d_sae, k, dtype, device, reps, warmup, only=None, deadline=None, sweep=STREAM_SWEEP) -> dict:
    cuda = device.startswith("cuda")
    sae, x, grad = make_inputs(T, d_in, d_sae, k, dtype=dtype, device=device)
    ext = False
    if cuda:
        from gradsae.backends import Request, get_backend

        try:
            ext = get_backend("cuda").unsupported(Request(x, grad, sae, k, explicit=True)) is None
        except Exception:
            ext = False
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "shape": {"T": T, "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": str(dtype).replace("torch.", "")},
           "cuda_extension": ext, "variants": {}}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    for name, fn in variants(sae, x, grad, ext, sweep).items():
        if only and not any(name == o or name.startswith(o + ".") or name.startswith(o + "@") for o in only):
            continue
        if deadline is not None and time.monotonic() > deadline:
            res["variants"][name] = {"error": "skipped: out of time"}
            continue
        env = {}
        if isinstance(fn, tuple):  # (environment, fn): e.g. the fold in another configuration
            env, fn = fn
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res["variants"][name] = measure(fn, reps, warmup, cuda)
        except Exception as e:  # record and go on: one broken variant must not hide the rest
            res["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500],
                                     "trace": traceback.format_exc()[-2000:]}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        print(f"{name:32} {json.dumps({k: v for k, v in res['variants'][name].items() if k != 'trace'})[:200]}",
              flush=True)
    from gradsae.op import strategy

    rep = strategy.report()
    res["strategy"] = {"override": rep["override"], "cache": rep["cache"],
                       "decisions": {key: d for key, d in rep["decisions"].items() if d["current"]}}
    gemm = res["variants"].get("gemm", {}).get("ms")
    dense = res["variants"].get("dense", {}).get("ms")
    for v in res["variants"].values():
        if "ms" in v:
            v["tokens_per_s"] = T / (v["ms"] / 1e3)
            v["gemm_over_this"] = gemm / v["ms"] if gemm else None      # >= 0.8 wanted (the op)
            v["dense_over_this"] = dense / v["ms"] if dense else None    # >= 3 wanted (the op)
    return res


def table(res: dict) -> str:
    lines = [f"{'variant':32} {'ms':>9} {'of gemm':>8} {'x dense':>8} {'extra MiB':>10}"]
    for name, v in res["variants"].items():
        if "ms" not in v:
            lines.append(f"{name:32} {v['error'][:60]}")
            continue
        g = f"{v['gemm_over_this']:.2f}" if v.get("gemm_over_this") else "-"
        d = f"{v['dense_over_this']:.2f}" if v.get("dense_over_this") else "-"
        lines.append(f"{name:32} {v['ms']:>9.3f} {g:>8} {d:>8} {v['peak_extra_bytes'] / 2**20:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="variant names (or prefixes: triton, cuda.chunked)")
    p.add_argument("--no-sweep", action="store_true", help="skip the fold-configuration sweep")
    p.add_argument("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shape on the CPU under TRITON_INTERPRET=1 (exercises the plumbing)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    sweep = () if args.no_sweep else STREAM_SWEEP
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (before triton is imported)",
                  file=sys.stderr)
            return 2
        res = run(16, 16, 512, 4, torch.float32, "cpu", 1, 1, args.only, deadline, ())
    elif not torch.cuda.is_available():
        print("bench/strategies.py: no CUDA GPU here (use --cpu-smoke for the plumbing)", file=sys.stderr)
        return 2
    else:
        res = run(args.T, args.d_in, args.d_sae, args.k, getattr(torch, args.dtype), "cuda", args.reps,
                  args.warmup, args.only, deadline, sweep)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print(table(res))
    return 0 if all("ms" in v for v in res["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
