"""One round of GPU checks on a lent GPU machine, as it is: its own python3 and packages, no
network, no pip downloads. ``make gpu-check`` runs it.

    python3 scripts/gpu_check.py                  # logs and JSON under $OUT (else ./gpu-check-out)
    python3 scripts/gpu_check.py --out DIR --kp256 --sanitizer
    python3 scripts/gpu_check.py --dry-run        # the same plumbing on a CPU (CI runs it)

Steps, each in its own process with its own time budget (a step that runs out is stopped
and reported; the next one still runs), the whole under 8 minutes on one H200:

  env      versions of python, torch, triton, nvcc and the driver; the GPU             15 s
  install  pip install --no-deps --no-build-isolation --no-index --target into the
           output folder (nothing is written to the system's site-packages)             45 s
  build    gradsae._C with nvcc for sm_90a and sm_90 (csrc/build.py), into the copy     100 s
  tests    the gpu-marked tests, GRADSAE_AUTOTUNE=small (two tile configurations per
           autotune), parallel processes when pytest-xdist is there; the KP=256 tier
           and compute-sanitizer only when asked (--kp256, --sanitizer)                  170 s
  bench    bench/strategies.py at T=8192 d_in=2304 d_sae=131072 k=64 bf16: fused vs
           chunked (Triton and CUDA), the dense anchor, the bare cuBLAS GEMM; memory    120 s

Output (at most 8 files, for a transfer that brings back a few): ``gpu-check.json`` (every
step's status, time, command and the end of its log; the environment; the benchmark),
``<step>.log`` for install, build, tests and bench, ``tests.xml`` (JUnit), and a short table
printed last. Exit status 0 only if every step passed.

``--dry-run``: CPU only. TRITON_INTERPRET=1, the install into a temporary folder, no build
(no nvcc work: there is no GPU to load it), the tests step collects the gpu-marked tests
(all skipped here) and runs the CPU ones that guard the same kernels, and the benchmark
runs its tiny --cpu-smoke shape. It exercises every step's plumbing in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_S = 470  # the whole round; steps are cut to what is left of it
BUDGET = {"env": 15, "install": 45, "build": 100, "tests": 170, "bench": 120}
DRY_BUDGET = {"env": 20, "install": 40, "build": 5, "tests": 60, "bench": 40}
LOG_TAIL = 4000


def _python() -> list[str]:
    # -P: the checkout is not on sys.path, so `import gradsae` finds the installed copy
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


class Round:
    def __init__(self, out: str, dry: bool):
        self.out = out
        self.dry = dry
        self.t0 = time.monotonic()
        self.steps: dict[str, dict] = {}
        self.strategy_decisions: dict | None = None
        self.site = os.path.join(out, "site") if not dry else tempfile.mkdtemp(prefix="gradsae-gpu-check-")
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = self.site + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["GRADSAE_AUTOTUNE"] = "small"
        self.env["GRADSAE_BUILD_CUDA"] = "0"  # the extension is built by its own step
        self.env.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gradsae-gpu-check-triton"))
        # the encode strategy is measured (no override) into a cache of this round, reported
        self.env.pop("GRADSAE_STRATEGY", None)
        self.strategy_cache = os.path.join(tempfile.mkdtemp(prefix="gradsae-gpu-check-strategy-"), "strategy.json")
        self.env["GRADSAE_STRATEGY_CACHE"] = self.strategy_cache
        if dry:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def left(self) -> float:
        return TOTAL_S - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], log: str | None, cwd: str = ROOT) -> dict:
        budget = (DRY_BUDGET if self.dry else BUDGET)[name]
        limit = max(5.0, min(budget, self.left()))
        t = time.monotonic()
        rec = {"cmd": " ".join(cmd), "budget_s": budget, "limit_s": round(limit, 1)}
        try:
            res = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=limit)
            text = res.stdout + res.stderr
            rec["status"] = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            rec["status"] = f"timed out after {limit:.0f} s"
        rec["seconds"] = round(time.monotonic() - t, 1)
        rec["log_tail"] = text[-LOG_TAIL:]
        if log:
            with open(os.path.join(self.out, log), "w") as f:
                f.write(f"$ {rec['cmd']}\n{text}")
            rec["log"] = log
        self.steps[name] = rec
        print(f"[gpu-check] {name:8} {rec['status']:28} {rec['seconds']:6.1f} s", flush=True)
        return rec

    def skip(self, name: str, why: str) -> None:
        self.steps[name] = {"status": f"skipped: {why}", "seconds": 0.0}
        print(f"[gpu-check] {name:8} skipped: {why}", flush=True)


ENV_PROBE = r"""
import json, platform, shutil, subprocess, sys
out = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = p.name
        out["capability"] = f"{p.major}.{p.minor}"
        out["sms"] = p.multi_processor_count
        out["memory_gib"] = round(p.total_memory / 2**30, 1)
        out["torch_cuda"] = torch.version.cuda
except Exception as e:
    out["torch_error"] = repr(e)
for mod in ("triton", "pybind11", "pytest", "xdist", "pytest_timeout"):
    try:
        m = __import__(mod)
        out[mod] = getattr(m, "__version__", "present")
    except Exception:
        out[mod] = None
for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                                                            "--format=csv,noheader"])):
    path = shutil.which(tool)
    if path:
        r = subprocess.run([path, *args], capture_output=True, text=True)
        out[tool] = (r.stdout or r.stderr).strip().splitlines()[-1:]
print(json.dumps(out))
"""


def step_env(r: Round) -> None:
    rec = r.run("env", _python() + ["-c", ENV_PROBE], None)
    try:
        r.steps["env"]["facts"] = json.loads(rec["log_tail"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return
    if rec["status"] == "ok" and "torch" not in r.steps["env"]["facts"]:
        rec["status"] = "failed (no torch)"
        print(f"[gpu-check] {sys.executable} cannot import torch; run it with a Python that has torch "
              "(make gpu-check PYTHON=.venv/bin/python)", flush=True)


def step_install(r: Round) -> None:
    if os.path.isdir(r.site) and not r.dry:
        shutil.rmtree(r.site)
    os.makedirs(r.site, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--no-compile", "--target", r.site, ROOT]
    rec = r.run("install", cmd, "install.log")
    probe = subprocess.run(_python() + ["-c", "import gradsae, gradsae.kernels; print(gradsae.__file__)"],
                           cwd=r.out, env=r.env, capture_output=True, text=True, timeout=60)
    rec["imports_from"] = (probe.stdout or probe.stderr).strip()[-300:]
    if rec["status"] == "ok" and not rec["imports_from"].startswith(r.site):
        rec["status"] = "failed (gradsae does not import from the installed copy)"


def step_build(r: Round) -> None:
    if r.dry:
        r.skip("build", "dry run (no GPU to load gradsae._C)")
        return
    so = os.path.join(r.site, "gradsae", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    jobs = max(1, min(8, os.cpu_count() or 1))
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from csrc.build import build; "
            f"build({so!r}, {os.path.join(r.out, 'build-tmp')!r}, targets=('90a', '90'), jobs={jobs})")
    r.run("build", _python() + ["-c", code], "build.log")
    shutil.rmtree(os.path.join(r.out, "build-tmp"), ignore_errors=True)


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401

        return True
    except ImportError:
        return False


def step_tests(r: Round, kp256: bool, sanitizer: bool) -> None:
    deselect = []
    if not kp256:
        deselect.append("not kp256")
    if not sanitizer:
        deselect.append("not compute_sanitizer")
    cmd = _python() + ["-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
                       "--junitxml", os.path.join(r.out, "tests.xml")]
    if deselect:
        cmd += ["-k", " and ".join(deselect)]
    try:
        import pytest_timeout  # noqa: F401

        cmd += ["--timeout", "120"]
    except ImportError:
        pass
    if r.dry:
        # the gpu-marked tests are collected and skipped; the interpreter tests of the same
        # kernels stand in for them at tiny shapes
        cmd += [os.path.join(ROOT, "tests", t) for t in ("test_triton_gpu.py", "test_chunked_gpu.py",
                                                         "test_strategy.py")]
        stream = os.path.join(ROOT, "tests", "test_triton_stream.py")
        cmd += [stream + "::test_chunks_must_ascend", stream + "::test_threshold_fold_counts_exactly_and_keeps_order"]
    else:
        if _has_xdist():
            cmd += ["-n", "4"]  # Triton compiles in parallel: the step is compile-bound
        cmd += ["-m", "gpu", os.path.join(ROOT, "tests")]
    with tempfile.TemporaryDirectory(prefix="gradsae-gpu-check-tests-") as cwd:  # (plugins' litter)
        r.run("tests", cmd, "tests.log", cwd=cwd)
    r.steps["tests"]["triton_cache_entries"] = _count_compiles(r.env["TRITON_CACHE_DIR"])


def _count_compiles(cache: str) -> int:
    n = 0
    for _, _, files in os.walk(cache):
        n += sum(f.endswith((".cubin", ".json")) and not f.startswith("__grp__") for f in files)
    return n


def step_bench(r: Round) -> None:
    path = os.path.join(r.out, "bench.json")
    cmd = _python() + [os.path.join(ROOT, "bench", "strategies.py"), "--json", path]
    if r.dry:
        cmd += ["--cpu-smoke", "--only", "gemm", "dense", "triton.fused.select", "triton.chunked"]
    else:
        cmd += ["--budget-s", str(max(10, min(BUDGET["bench"], r.left()) - 15))]
    r.run("bench", cmd, "bench.log")
    if os.path.exists(path):
        with open(path) as f:
            r.steps["bench"]["results"] = json.load(f)
        os.remove(path)  # kept inside gpu-check.json (fewer files to bring back)


def _strategy_decisions(path: str) -> dict:
    """The encode-strategy decisions the round measured (tests and bench), by bucket."""
    try:
        with open(path) as f:
            return json.load(f).get("decisions", {})
    except (OSError, ValueError, AttributeError):
        return {}


def summary(r: Round) -> str:
    lines = ["", "gpu-check " + ("(dry run) " if r.dry else "") + f"{time.monotonic() - r.t0:.0f} s"]
    facts = r.steps.get("env", {}).get("facts", {})
    if facts:
        lines.append(f"  {facts.get('gpu', 'no GPU')}  python {facts.get('python')}  torch {facts.get('torch')}  "
                     f"triton {facts.get('triton')}")
    for name, rec in r.steps.items():
        lines.append(f"  {name:8} {rec['status']:30} {rec['seconds']:6.1f} s")
    bench = r.steps.get("bench", {}).get("results")
    for key, d in (r.strategy_decisions or {}).items():
        secs = ", ".join(f"{s} {t * 1e3:.3f} ms" for s, t in sorted((d.get("seconds") or {}).items()))
        lines.append(f"  strategy {key}: {d.get('strategy')} ({secs})")
    if bench:
        lines.append(f"  bench {bench['shape']}")
        lines.append(f"  {'variant':30} {'ms':>9} {'of gemm':>8} {'x dense':>8} {'extra MiB':>10}")
        for name, v in bench["variants"].items():
            if "ms" in v:
                g = f"{v['gemm_over_this']:.2f}" if v.get("gemm_over_this") else "-"
                d = f"{v['dense_over_this']:.2f}" if v.get("dense_over_this") else "-"
                lines.append(f"  {name:30} {v['ms']:>9.3f} {g:>8} {d:>8} {v['peak_extra_bytes'] / 2**20:>10.1f}")
            else:
                lines.append(f"  {name:30} {v['error'][:70]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-check-out"))
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on a CPU (tiny shapes, interpreter)")
    ap.add_argument("--kp256", action="store_true", help="also the KP=256 tier of the Triton GPU tests")
    ap.add_argument("--sanitizer", action="store_true", help="also the compute-sanitizer tests")
    ap.add_argument("--steps", nargs="*", default=["env", "install", "build", "tests", "bench"],
                    help="a subset of the steps, in order")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    r = Round(os.path.abspath(args.out), args.dry_run)
    for step in args.steps:
        if r.left() < 5:
            r.skip(step, "out of time")
            continue
        if r.steps.get("env", {}).get("status") == "failed (no torch)":
            r.skip(step, "no torch in this Python")
            continue
        {"env": lambda: step_env(r), "install": lambda: step_install(r), "build": lambda: step_build(r),
         "tests": lambda: step_tests(r, args.kp256, args.sanitizer), "bench": lambda: step_bench(r)}[step]()
    if r.dry:
        shutil.rmtree(r.site, ignore_errors=True)
    r.strategy_decisions = _strategy_decisions(r.strategy_cache)
    shutil.rmtree(os.path.dirname(r.strategy_cache), ignore_errors=True)
    report = {"dry_run": r.dry, "seconds": round(time.monotonic() - r.t0, 1), "total_budget_s": TOTAL_S,
              "steps": r.steps, "strategy_decisions": r.strategy_decisions}
    with open(os.path.join(r.out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(summary(r))
    ok = all(rec["status"] == "ok" or rec["status"].startswith("skipped: dry run") for rec in r.steps.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
