"""Show gradsae's version, its dependencies, which backends can run here (and why not), and
the encode strategy the GPU backends run (the override and the decisions measured here)."""

from __future__ import annotations

import platform

HELP = "versions and available backends"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


def collect() -> dict:
    import torch

    import gradsae
    from gradsae.backends import Request, available_backends, get_backend

    info = {
        "gradsae": gradsae.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__ + ("" if torch.cuda.is_available() else " (no GPU: interpreter only)")
    except Exception as e:  # noqa: BLE001 - report whatever stops it importing
        info["triton"] = f"unavailable ({e})"
    # Probe each backend with a tiny request on the best device here.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d_in, d_sae = 64, 256
    sae = gradsae.SAE(
        torch.zeros(d_in, d_sae, device=device), torch.zeros(d_sae, device=device),
        torch.zeros(d_sae, d_in, device=device), torch.zeros(d_in, device=device), "topk", k=8,
    )
    req = Request(torch.zeros(1, d_in, device=device), torch.zeros(1, d_in, device=device), sae, 8)
    backends = {}
    for name in available_backends():
        b = get_backend(name)
        why = b.unsupported(req)
        # what the backend says of itself, without overriding whether it serves here
        extra = {k: v for k, v in (b.describe() if hasattr(b, "describe") else {}).items()
                 if k not in ("available", "reason", "name")}
        entry = {"available": why is None, "reason": why, **extra}
        if name == "triton" and not torch.cuda.is_available():
            entry["available"] = False
            entry["reason"] = ("no GPU: interpreter only (TRITON_INTERPRET=1 and backend='triton', for tests)"
                               if why is None or extra.get("interpreter") or "TRITON_INTERPRET" in str(why)
                               else why)
        backends[name] = entry
    info["backends"] = backends
    from gradsae.op import strategy

    info["strategy"] = strategy.report()
    return info


def _print_strategy(rep: dict) -> None:
    from gradsae.op import strategy

    forced = rep["override"]
    print("encode strategy (fused | chunked) of the GPU backends:")
    print(f"  {'override':13s} " + (f"GRADSAE_STRATEGY={forced}" if forced else
                                    "none (GRADSAE_STRATEGY unset: chosen by measurement)"))
    print(f"  {'cache':13s} {rep['cache']}" + (f"  (ignored: {rep['cache_problem']})" if rep["cache_problem"] else ""))
    if not rep["decisions"]:
        print("  no decisions measured yet (each shape bucket is timed on its first large call on a GPU)")
    for key, d in rep["decisions"].items():
        secs = d.get("seconds") or {}
        times = ", ".join(f"{s} {secs[s] * 1e3:.3f} ms" for s in strategy.STRATEGIES if s in secs)
        stale = "" if d["current"] else "  [other versions: measured again on next use]"
        print(f"  {key}: {d['strategy']} ({times}){stale}")


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k not in ("backends", "strategy"):
            print(f"{k:15s} {v}")
    print("backends (priority order):")
    for name, e in info["backends"].items():
        state = "yes" if e["available"] else f"no: {e['reason']}"
        extra = {k: v for k, v in e.items() if k not in ("available", "reason")}
        print(f"  {name:10s} {state}" + (f"  {extra}" if extra else ""))
    _print_strategy(info["strategy"])
    return 0
