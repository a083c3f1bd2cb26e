"""Build of the CUDA extension ``gradsae._C`` with nvcc alone.

The module does not link libtorch (torch's ``CUDAExtension`` cannot build against a CPU-only
torch): it is plain C++/CUDA plus pybind11, cudart linked statically (``-cudart static``), so
it imports on machines without a GPU and works with any torch build that hands it device
pointers. Code is generated as SASS for sm_80 and sm_90 plus compute_90 PTX (JIT-compiled by
the driver on newer GPUs); no Hopper-only (sm_90a) instructions are used.

Used by setup.py (``cuda_extension()``) and by the build test (``build()`` into a temporary
folder). Environment: ``CUDA_HOME`` / ``CUDA_PATH`` or ``nvcc`` on PATH locate the toolkit;
``GRADSAE_CUDA_ARCHS`` (e.g. ``80,90``) overrides the SASS targets; ``GRADSAE_BUILD_JOBS``
sets how many sources compile at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("encode.cu", "gather.cu", "stream.cu", "bindings.cpp", "stream_bindings.cpp")
HEADERS = ("select.cuh", "common.cuh", "launch.h", "stats_fields.h", "stream.cuh", "stream.h")
DEFAULT_ARCHS = ("80", "90")
NVCC_MISSING = (
    "gradsae: building the CUDA extension (GRADSAE_BUILD_CUDA=1) needs nvcc, the CUDA compiler, "
    "and none was found: install the CUDA toolkit (12.x or newer) and put its bin/ on PATH or set "
    "CUDA_HOME; or build without the extension with GRADSAE_BUILD_CUDA=0."
)


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def find_cuobjdump() -> str | None:
    """cuobjdump from the toolkit, or the copy Triton bundles; None if neither exists."""
    import shutil

    nvcc = find_nvcc()
    cands = [os.path.join(os.path.dirname(nvcc), "cuobjdump")] if nvcc else []
    cands += [shutil.which("cuobjdump") or "", "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c)), None)


def _cc(a: str) -> int:
    """The numeric compute capability of a target ("90a" -> 90)."""
    return int(a.rstrip("a"))


def archs() -> tuple[str, ...]:
    """SASS targets (compute capabilities without the dot, an architecture-specific target
    with its ``a``: ``90a``), from GRADSAE_CUDA_ARCHS or the default."""
    env = os.environ.get("GRADSAE_CUDA_ARCHS", "").replace(";", ",").strip()
    if not env:
        return DEFAULT_ARCHS
    out = tuple(a.strip().replace(".", "").removeprefix("sm_") for a in env.split(",") if a.strip())
    for a in out:
        if not a.rstrip("a").isdigit() or a.count("a") > 1 or _cc(a) < 80:
            raise RuntimeError(f"GRADSAE_CUDA_ARCHS: {a!r} is not a compute capability >= 8.0 (e.g. 80,90 or 90a)")
    return out


def _ptx_target(targets: tuple[str, ...]) -> str:
    """PTX goes with the newest portable target (architecture-specific PTX, sm_90a's, runs on
    that architecture alone), or the newest of all when every target is specific."""
    portable = [a for a in targets if not a.endswith("a")]
    return max(portable or targets, key=_cc)


def gencode_flags(targets: tuple[str, ...]) -> list[str]:
    """SASS for every target, PTX for the newest portable one (forward compatibility)."""
    flags = []
    for a in targets:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = _ptx_target(targets)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def arch_names(targets: tuple[str, ...]) -> str:
    return ", ".join([f"sm_{a}" for a in targets] + [f"compute_{_ptx_target(targets)}"])


def _includes() -> list[str]:
    import pybind11

    return ["-I" + HERE, "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]


def compile_commands(nvcc: str, tmp: str, targets: tuple[str, ...], sources=SOURCES) -> list[tuple[str, list[str]]]:
    """(object path, nvcc command) for every source."""
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-I" + tmp]
    common += _includes()
    out = []
    for src in sources:
        obj = os.path.join(tmp, os.path.splitext(src)[0] + ".o")
        cmd = [nvcc, "-c", os.path.join(HERE, src), "-o", obj] + common
        if src.endswith(".cu"):
            cmd += gencode_flags(targets) + ["--expt-relaxed-constexpr", "-lineinfo"]
        out.append((obj, cmd))
    return out


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"gradsae: CUDA build step failed:\n  {' '.join(cmd)}\n{res.stdout}{res.stderr}")


def build(output: str, build_temp: str | None = None, targets: tuple[str, ...] | None = None,
          jobs: int | None = None, link: bool = True) -> list[str]:
    """Compile csrc/ with nvcc and link ``output`` (the extension's .so). With ``link=False``
    stop after the object files. Returns the object paths. The .so appears atomically."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError(NVCC_MISSING)
    targets = targets or archs()
    tmp = build_temp or tempfile.mkdtemp(prefix="gradsae-cuda-")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "gradsae_build_info.h"), "w") as f:
        f.write(f'#define GRADSAE_ARCHS "{arch_names(targets)}"\n')
    cmds = compile_commands(nvcc, tmp, targets)
    jobs = jobs or int(os.environ.get("GRADSAE_BUILD_JOBS", "0")) or min(len(cmds), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(_run, cmd) for _, cmd in cmds]:
            fut.result()
    objs = [obj for obj, _ in cmds]
    if link:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        partial = output + ".tmp"
        _run([nvcc, "-shared", "-cudart", "static", "--no-device-link", *objs, "-o", partial])
        os.replace(partial, output)
    return objs


class BuildCudaExt(build_ext):
    """build_ext that compiles ``gradsae._C`` with nvcc (other extensions: the default)."""

    def build_extension(self, ext):
        if ext.name != "gradsae._C":
            return super().build_extension(ext)
        if find_nvcc() is None:
            sys.stderr.write(NVCC_MISSING + "\n")
            raise RuntimeError(NVCC_MISSING)
        out = self.get_ext_fullpath(ext.name)
        build(out, os.path.join(self.build_temp, "gradsae_C"))


def cuda_extension():
    """(Extension, build_ext class) for setup.py."""
    if find_nvcc() is None:
        raise RuntimeError(NVCC_MISSING)
    rel = os.path.relpath(HERE, os.getcwd())
    ext = Extension(
        "gradsae._C",
        sources=[os.path.join(rel, s) for s in SOURCES],
        depends=[os.path.join(rel, h) for h in HEADERS],
    )
    return ext, BuildCudaExt
