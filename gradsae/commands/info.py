"""Show gradsae's version, its dependencies, and which backends can run here (and why not)."""

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
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k != "backends":
            print(f"{k:15s} {v}")
    print("backends (priority order):")
    for name, e in info["backends"].items():
        state = "yes" if e["available"] else f"no: {e['reason']}"
        extra = {k: v for k, v in e.items() if k not in ("available", "reason")}
        print(f"  {name:10s} {state}" + (f"  {extra}" if extra else ""))
    return 0
