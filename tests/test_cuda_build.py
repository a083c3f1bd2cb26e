"""The CUDA extension compiles wherever nvcc exists (no GPU needed): the real csrc/ sources,
SASS for sm_80 and sm_90 plus compute_90 PTX, cudart linked statically, and the result
imports and answers without touching a device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from csrc.build import NVCC_MISSING, arch_names, find_cuobjdump, find_nvcc, gencode_flags  # noqa: E402

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_gencode_flags_cover_sm80_sm90_and_ptx():
    flags = gencode_flags(("80", "90"))
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]
    assert arch_names(("80", "90")) == "sm_80, sm_90, compute_90"


def test_gencode_flags_for_sm90a(monkeypatch):
    """The Hopper-specific target compiles SASS for sm_90a; PTX stays portable (compute_90)."""
    import csrc.build as b

    flags = gencode_flags(("90a", "90"))
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_90a,code=sm_90a", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]
    assert arch_names(("90a", "90")) == "sm_90a, sm_90, compute_90"
    monkeypatch.setenv("GRADSAE_CUDA_ARCHS", "sm_90a, 90")
    assert b.archs() == ("90a", "90")
    monkeypatch.setenv("GRADSAE_CUDA_ARCHS", "90aa")
    with pytest.raises(RuntimeError):
        b.archs()


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    import csrc.build as b

    monkeypatch.setattr(b, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError) as e:
        b.build(str(tmp_path / "_C.so"))
    assert e.value.args[0] == NVCC_MISSING and "nvcc" in NVCC_MISSING and "GRADSAE_BUILD_CUDA=0" in NVCC_MISSING


def test_sources_agree_with_the_python_side():
    """csrc keeps its own copies of two facts the Python side passes it: the statistics tables'
    order (csrc/stats_fields.h, gradsae.stats.FIELDS) and the widest top-k (csrc/select.cuh
    kMaxK, gradsae.op.MAX_K). A difference must fail here, before any build."""
    from gradsae.op import MAX_K
    from gradsae.stats import FIELDS

    header = open(os.path.join(ROOT, "csrc", "stats_fields.h")).read()
    macro = re.search(r"#define GRADSAE_STATS_FIELDS\(X\)((?:.*\\\n)*.*)", header).group(1)
    assert tuple(re.findall(r"X\((\w+),", macro)) == FIELDS
    select = open(os.path.join(ROOT, "csrc", "select.cuh")).read()
    assert int(re.search(r"constexpr int kMaxK = (\d+);", select).group(1)) == MAX_K


@pytest.mark.slow
@needs_nvcc
def test_extension_builds_for_sm80_sm90(tmp_path, record_property):
    from csrc.build import build

    so = str(tmp_path / "_C.so")
    t0 = time.perf_counter()
    build(so, str(tmp_path / "obj"), targets=("80", "90"))
    record_property("build_seconds", round(time.perf_counter() - t0, 1))

    # the embedded device code: SASS for both targets, PTX for the newest
    cuobjdump = find_cuobjdump()
    assert cuobjdump, "no cuobjdump (CUDA toolkit or Triton's copy) to inspect the build"
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    cubins = sorted(re.findall(r"sm_\d+", elf))
    assert cubins == ["sm_80"] * 3 + ["sm_90"] * 3, elf  # encode, gather, stream; each target
    assert "sm_90" in ptx and "sm_80" not in ptx, ptx
    # cudart is static: no libcudart.so dependency
    deps = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    assert "libcudart" not in deps, deps

    # import in a fresh interpreter; nothing may touch a GPU at import or for these calls
    probe = textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("_C", {so!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        res = {{"archs": m.compiled_archs(), "runtime": m.cuda_runtime_version(), "max_k": m.MAX_K,
                "stats_fields": list(m.STATS_FIELDS),
                "pads": [m.topk_pad(k) for k in (1, 32, 33, 64, 65, 200, 256)]}}
        try:
            m.encode_select(device=0, stream=0, x=0, x_stride=0, w=0, w_stride=0, bias=0, scale=0, thr=0,
                            dtype=2, n=1, d_in=8, d_sae=256, mode=0, k=8, kp=32, cap=0, split_cols=100,
                            n_splits=3, tile_rows=64, parts=0, counts=0, vec=False)
        except ValueError as e:
            res["bad_split"] = str(e)
        try:
            m.merge_topk(device=0, stream=0, parts=0, n=1, n_splits=1, k=300, kp=512, idx=0, acts=0)
        except ValueError as e:
            res["bad_k"] = str(e)
        try:
            m.segment_stats(device=0, stream=0, j=0, acts=0, scores=0, m=1, stats=(0, 0))
        except ValueError as e:
            res["bad_stats"] = str(e)
        try:
            m.stream_topk(device=0, stream=0, p=0, p_stride=8, dtype=2, n=1, ncols=8, c0=0, bias=0, scale=0,
                          k=40, kp=32, best=0, vec=False)
        except ValueError as e:
            res["bad_stream_k"] = str(e)
        res["stream_smem"] = m.stream_topk_smem_bytes(64)
        print(json.dumps(res))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    assert res["archs"] == "sm_80, sm_90, compute_90"
    release = re.search(r"release (\d+)\.(\d+)", subprocess.run([NVCC, "--version"], capture_output=True,
                                                               text=True).stdout)
    assert res["runtime"] == int(release.group(1)) * 1000 + int(release.group(2)) * 10
    from gradsae.op import MAX_K
    from gradsae.stats import FIELDS

    assert res["max_k"] == MAX_K == 256
    assert tuple(res["stats_fields"]) == FIELDS
    assert "6 table pointers in STATS_FIELDS order, got 2" in res["bad_stats"]
    assert res["pads"] == [32, 32, 64, 64, 128, 256, 256]
    assert "split_cols" in res["bad_split"]
    assert "k <= kp <= 256" in res["bad_k"]
    assert "k <= kp <= 256" in res["bad_stream_k"]
    assert res["stream_smem"] == 8 * (64 + 256) * 8  # 8 warps x (best + queue) keys
