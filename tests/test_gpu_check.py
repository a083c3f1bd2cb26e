"""`make gpu-check --dry-run`: the GPU round's plumbing on the CPU, so the script cannot rot
between the rare runs on a lent GPU machine. Every step runs (the extension build is
skipped: nothing could load it), the package is installed into a temporary folder and the
tests import it from there, the benchmark runs its tiny interpreter shape, and the report
and the table come out."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--dry-run", "--out",
                          str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["env", "install", "build", "tests", "bench"]
    assert report["strategy_decisions"] == {}  # nothing can be timed on a CPU
    assert steps["build"]["status"].startswith("skipped: dry run")
    for name in ("env", "install", "tests", "bench"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert "gradsae-gpu-check-" in steps["install"]["imports_from"]  # the installed copy, not the checkout
    assert " passed" in steps["tests"]["log_tail"] and "skipped" in steps["tests"]["log_tail"]
    bench = steps["bench"]["results"]
    assert {"gemm", "dense", "triton.fused.select", "triton.chunked"} <= set(bench["variants"])
    assert all("ms" in v for v in bench["variants"].values()), bench["variants"]
    # every file comes back from a device run: few, flat, plain names
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert "gpu-check (dry run)" in res.stdout and "triton.chunked" in res.stdout.splitlines()[-1] + res.stdout
