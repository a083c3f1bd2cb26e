"""The benchmark harness runs end to end at a tiny shape and records what it measured."""

import json
import subprocess
import sys


def test_bench_command_writes_results(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, "-m", "gradsae", "bench", "--T", "16", "--d-in", "32", "--d-sae", "256", "--k", "8",
         "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "gradsae" in res.stdout and "dense" in res.stdout and "gemm" in res.stdout
    table = json.loads(out.read_text())
    (run,) = table["runs"].values()
    assert set(run["variants"]) == {"gradsae", "dense", "gemm"}
    for v in run["variants"].values():
        assert v["time_s"] > 0 and v["peak_extra_bytes"] >= 0
    assert run["shape"] == {"T": 16, "d_in": 32, "d_sae": 256, "k": 8, "dtype": "float32"}
    assert run["summary"]["speedup_vs_dense"] > 0
