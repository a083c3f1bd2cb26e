"""The Triton kernels' default configurations compile for sm_90 (Hopper) without a GPU, and
ptxas finds no register spills, no stack frame, and no more shared memory than a block has
(227 KB): every configuration a GPU run uses by default (the fixed ones, the autotune list
under GRADSAE_AUTOTUNE=small, the streaming folds, the gather-dot), in bf16 and fp32.
scripts/ptxas_report.py records every listed configuration in
bench/results/ptxas-sm90-triton.json; here it runs with --defaults in a fresh interpreter
(the tests' own process has TRITON_INTERPRET set, whose kernels cannot be compiled)."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(PTXAS), reason="this Triton ships no ptxas")
def test_default_configurations_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "ptxas.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ptxas_report.py"), "--defaults",
                          "--dtype", "bfloat16", "float32", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.exists(), res.stdout + res.stderr
    records = json.loads(out.read_text())["records"]
    assert {r["kernel"] for r in records} == {"encode_topk", "encode_threshold", "stream_topk", "stream_threshold",
                                              "gather_dot"}
    bad = [r for r in records if r["problems"]]
    assert not bad, json.dumps(bad, indent=1)
    for r in records:
        if r["kernel"].startswith("encode") and r["dtype"] == "*bf16":
            assert r["wgmma"] and r["cp_async"], r  # Hopper's MMA, a pipelined K-loop
    assert res.returncode == 0, res.stdout + res.stderr


def test_ptxas_report_parser():
    from gradsae.kernels import aot

    text = ("ptxas info    : Function properties for k\n    16 bytes stack frame, 8 bytes spill stores, 12 bytes "
            "spill loads\nptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size")
    assert aot.parse_ptxas(text) == {"registers": 255, "stack": 16, "spill_stores": 8, "spill_loads": 12}
    rec = {"spill_stores": 8, "spill_loads": 12, "stack": 16, "shared": 256 * 1024}
    assert len(aot.problems(rec)) == 3
