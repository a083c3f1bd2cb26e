"""Time `gradsae validate --demo` end to end (the README promises under 2 minutes on a
2-core CPU) and record what it printed.

    python bench/validate_demo.py                  # default settings, 2 runs
    python bench/validate_demo.py --repeat 1 -- --steps 128

Each run is a fresh ``python -m gradsae validate --demo`` process (imports, model loading,
the validation, writing CSV/JSON/PNG); the wall time of the whole process is measured, with
the machine's load average before it (other work on a shared machine slows it down). Results
go to bench/results/cpu-validate-demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-validate-demo.json"))
    ap.add_argument("extra", nargs="*", help="more arguments for gradsae validate (after --)")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "gradsae", "validate", "--demo", "--out", d, *args.extra],
                                 capture_output=True, text=True, cwd=d,
                                 env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            summary = json.loads((Path(d) / "validate.json").read_text())["summary"]
        runs.append({"wall_s": round(wall, 2), "load_avg_1min_before": load, "stdout": res.stdout.splitlines(),
                     "summary": summary})
        print(f"{wall:.1f} s (load average {load:.1f})")
    doc = {"command": "gradsae validate --demo " + " ".join(args.extra), "cpu": cpu_name(),
           "cores": os.cpu_count(), "python": platform.python_version(), "runs": runs,
           "fastest_wall_s": min(r["wall_s"] for r in runs)}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
