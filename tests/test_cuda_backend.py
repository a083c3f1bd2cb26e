"""The ``cuda`` backend (gradsae._C) against the float64 oracle.

Without a GPU only the dispatch facts run (registration, reasons for not serving, describe).
The ``gpu`` tests need a CUDA GPU and the extension built (GRADSAE_BUILD_CUDA=1): every
activation and SAE option, float32 / bfloat16 / float16 (the 2x rule against the reference
in the same dtype), ragged token counts and d_sae / d_in off the tile and vector widths,
k from 1 to 256, threshold capacities (each of these with both encode strategies, chunked
and fused), the gather-dot of influence_at, the fused and the deterministic LatentStats
accumulation, realistic shapes, and compute-sanitizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, option_cases, random_inputs, random_sae

import gradsae
from gradsae.backends import Request, available_backends, get_backend
from gradsae.errors import BackendError, CapacityError
from gradsae.stats import LatentStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built() -> bool:
    try:
        from gradsae import _C  # noqa: F401
    except ImportError:
        return False
    return True


BUILT = _built()
needs_ext = pytest.mark.skipif(not BUILT, reason="gradsae._C is not built (GRADSAE_BUILD_CUDA=1)")
DEV = "cuda"


# ---------------------------------------------------------------------------- dispatch facts (any machine)
def test_registered_before_reference():
    names = available_backends()
    assert "cuda" in names and names.index("cuda") < names.index("reference")


def test_reasons_for_not_serving_cpu_tensors():
    sae = random_sae(16, 64, "topk", k=4)
    x = torch.randn(3, 16)
    why = get_backend("cuda").unsupported(Request(x, x, sae, 4))
    if BUILT:
        assert why == "tensors are on cpu"
    else:
        assert why == "gradsae._C is not built (reinstall with GRADSAE_BUILD_CUDA=1)"
    with pytest.raises(BackendError, match="backend 'cuda' cannot serve this input"):
        gradsae.influence(x, x, sae, backend="cuda")
    # auto falls through to a backend that serves
    out = gradsae.influence(x, x, sae)
    assert out.K == 4


def test_describe_reports_the_build():
    d = get_backend("cuda").describe()
    assert d["built"] is BUILT
    if BUILT:
        from gradsae import _C

        assert d["archs"] == _C.compiled_archs() and "sm_80" in d["archs"] and "sm_90" in d["archs"]
        v = _C.cuda_runtime_version()
        assert d["cuda_runtime"] == f"{v // 1000}.{(v % 1000) // 10}"


def test_info_lists_the_cuda_backend():
    from gradsae.commands.info import collect

    info = collect()
    entry = info["backends"]["cuda"]
    assert entry["available"] is (BUILT and torch.cuda.is_available())
    assert entry["built"] is BUILT


# ---------------------------------------------------------------------------- GPU: against the oracle
CASES = option_cases((32, 64, 1, 100, 256))


def _inputs(lead, d_in, dtype=torch.float32, scale=2.0):
    return random_inputs(lead, d_in, DEV, dtype, scale)


def _relu_sae(d_in, d_sae, dtype=torch.float32):
    """A relu SAE with a few dozen active latents per row at d_sae in the thousands."""
    sae = random_sae(d_in, d_sae, "relu", dtype=dtype, device=DEV)
    sae.b_enc -= 2.5
    sae._cache.clear()
    return sae


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("activation,rescale,normalize,apply_b_dec,k", CASES)
@pytest.mark.parametrize("lead,d_in,d_sae", [((3, 101), 768, 16384), ((77,), 770, 5003)])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_matches_oracle_float32(monkeypatch, strategy, activation, rescale, normalize, apply_b_dec, k, lead, d_in,
                                d_sae):
    """Ragged rows (not a multiple of the 64-row tile), d_sae off the 128-column tile, d_in off
    the 8-element vector width (scalar load path); both encode strategies."""
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # chunked: an fp32 GEMM in fp32
    sae = random_sae(d_in, d_sae, activation, k=k or 8, normalize=normalize, rescale=rescale,
                     apply_b_dec=apply_b_dec, device=DEV, scalar_threshold=activation == "batchtopk")
    if activation != "topk":
        sae.b_enc -= 1.5  # tens of active latents per row, not thousands
        sae._cache.clear()
    x, g = _inputs(lead, d_in)
    out = gradsae.influence(x, g, sae, backend="cuda")
    assert out.indices.shape[:-1] == lead
    orc = dense_oracle(sae, x, g)
    scale = float(orc["v"].abs().max())
    tol = 2e-5 * scale * (d_in ** 0.5)
    if activation == "topk":
        assert out.K == k
    else:  # sized to its fullest row, which the oracle's agrees with up to values at the threshold
        assert out.K == max(1, int((out.indices >= 0).sum(-1).max()))
        margin = orc["v"] - orc["thr"]
        assert int((margin > tol).sum(-1).max()) <= out.K <= max(1, int((margin > -tol).sum(-1).max()))
    assert_matches_oracle(out, orc, sae, atol=tol, rtol=1e-4)
    torch.testing.assert_close(out.scores, out.acts * out.grads)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,normalize,rescale", [("topk", "none", True), ("topk", "layer_norm", False),
                                                          ("jumprelu", "constant_norm_rescale", False)])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_low_precision_within_twice_the_reference_error(monkeypatch, strategy, dtype, activation, normalize, rescale):
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    d_in, d_sae = 1024, 8192
    sae = random_sae(d_in, d_sae, activation, k=64, normalize=normalize, rescale=rescale, dtype=dtype, device=DEV)
    if activation != "topk":
        sae.b_enc -= 1.5
        sae._cache.clear()
    x, g = _inputs((300,), d_in, dtype)
    orc = dense_oracle(sae, x, g)
    ours = gradsae.influence(x, g, sae, backend="cuda")
    ref = gradsae.influence(x, g, sae, backend="reference")
    assert ours.acts.dtype == torch.float32
    e_ours, e_ref = max_errors(ours, orc), max_errors(ref, orc)
    eps = torch.finfo(dtype).eps
    scale_a, scale_g = float(orc["v"].abs().max()), float(orc["g"].abs().max())
    floor = {"acts": eps * scale_a, "grads": eps * scale_g, "scores": eps * scale_a * scale_g}
    for f in ("acts", "grads", "scores"):
        assert e_ours[f] <= 2 * e_ref[f] + floor[f], (f, e_ours, e_ref)
    assert_matches_oracle(ours, orc, sae, atol=64 * eps * (scale_a + scale_g), rtol=0.05, set_tol=64 * eps * scale_a)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("d_sae,k", [(1, 1), (97, 97), (300, 256), (128, 128), (5000, 255)])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_topk_k_edge_cases(monkeypatch, strategy, d_sae, k):
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    # (k > d_sae is refused when the SAE is built: tests/test_sae.py)
    sae = random_sae(48, d_sae, "topk", k=k, device=DEV)
    x, g = _inputs((70,), 48)
    out = gradsae.influence(x, g, sae, backend="cuda")
    assert out.K == k
    assert_matches_oracle(out, dense_oracle(sae, x, g), sae, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_threshold_capacity_rules(monkeypatch, strategy):
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    """k=None sizes the output to the fullest row (the op's first guess of INITIAL_CAPACITY
    slots overflows and is re-run); a smaller k raises the op's CapacityError; a larger one
    pads."""
    from gradsae.op import INITIAL_CAPACITY

    sae = _relu_sae(256, 4096)
    x, g = _inputs((500,), 256)
    full = gradsae.influence(x, g, sae, backend="cuda")
    counts = (full.indices >= 0).sum(-1)
    need = int(counts.max())
    assert full.K == need and need > INITIAL_CAPACITY
    orc = dense_oracle(sae, x, g)
    assert_matches_oracle(full, orc, sae, atol=1e-3, rtol=1e-4, set_tol=1e-4)
    with pytest.raises(CapacityError) as e:
        gradsae.influence(x, g, sae, k=need - 1, backend="cuda")
    assert str(e.value) == (
        f"token {int(counts.argmax())} has {need} active latents but the capacity is k={need - 1}; "
        f"pass k>={need} (or k=None to size the output to the fullest row)"
    )
    roomy = gradsae.influence(x, g, sae, k=need + 5, backend="cuda")
    assert roomy.K == need + 5 and bool((roomy.indices[:, need:] == -1).all())
    assert torch.equal(roomy.indices[:, :need], full.indices)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_influence_at_gather_dot(dtype):
    sae = random_sae(520, 3000, "topk", k=40, normalize="layer_norm", rescale=True, dtype=dtype, device=DEV)
    x, g = _inputs((2, 90), 520, dtype)
    idx, acts = gradsae.encode_sparse(x, sae, backend="cuda")
    ours = gradsae.influence_at(idx, acts, g, sae, x=x, backend="cuda")
    ref = gradsae.influence_at(idx, acts, g, sae, x=x, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grads, ref.grads, rtol=tol, atol=tol * float(ref.grads.abs().max()))
    # strided inputs (no vector loads) give the same result
    D = torch.empty(g.shape[0], g.shape[1], 2 * 520 + 3, dtype=dtype, device=DEV)[..., 3:523]
    D.copy_(g)
    strided = gradsae.influence_at(idx, acts, D, sae, x=x, backend="cuda")
    # (another summation order: float32 rounding apart)
    torch.testing.assert_close(strided.grads, ours.grads, rtol=1e-5, atol=1e-5 * float(ours.grads.abs().max()))


def _stats_close(a: LatentStats, b: LatentStats, rtol=1e-5):
    assert a.tokens == b.tokens
    assert torch.equal(a.count.cpu(), b.count.cpu())
    atol = 1e-5 * float(b.abs_sum.max())  # float32 scores; sums of mixed signs cancel
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum", "score_max"):
        ta, tb = getattr(a, f).cpu(), getattr(b, f).cpu()
        torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=f)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_fused_and_deterministic_stats(activation):
    d_in, d_sae = 384, 2048
    sae = random_sae(d_in, d_sae, activation, k=32, normalize="constant_norm_rescale", device=DEV)
    if activation != "topk":
        sae.b_enc -= 1.0
        sae._cache.clear()
    x, g = _inputs((600,), d_in)
    mask = torch.rand(600, device=DEV) > 0.3

    # the same active set through Influence + LatentStats.update (the influence op itself is
    # compared with the oracle above; here only the accumulation differs)
    out = gradsae.influence(x, g, sae, backend="cuda")
    assert_matches_oracle(out, dense_oracle(sae, x, g), sae, atol=1e-3, rtol=1e-4, set_tol=1e-4)
    want = LatentStats(d_sae, device=DEV)
    want.update(out, mask)

    fused = LatentStats(d_sae, device=DEV)
    gradsae.accumulate_influence(x, g, sae, fused, mask, backend="cuda")
    _stats_close(fused, want)

    runs = []
    for _ in range(2):
        s = LatentStats(d_sae, device=DEV)
        gradsae.accumulate_influence(x, g, sae, s, mask, backend="cuda", deterministic=True)
        runs.append(s)
    assert runs[0] == runs[1]  # bitwise
    _stats_close(runs[0], want)


@pytest.mark.gpu
@needs_ext
def test_realistic_shape_rows_match_oracle():
    """T=4096, d_in=2304, d_sae=65536, k=64, bf16: many splits and row blocks; the oracle on a
    sample of rows (first, middle and last blocks)."""
    d_in, d_sae, T = 2304, 65536, 4096
    sae = random_sae(d_in, d_sae, "topk", k=64, dtype=torch.bfloat16, device=DEV)
    x, g = _inputs((T,), d_in, torch.bfloat16)
    out = gradsae.influence(x, g, sae, backend="cuda")
    rows = torch.cat([torch.arange(0, 64), torch.arange(2000, 2050), torch.arange(T - 70, T)])
    orc = dense_oracle(sae, x[rows], g[rows])
    sub = gradsae.Influence(out.indices[rows], out.acts[rows], out.grads[rows], out.scores[rows], d_sae)
    eps = torch.finfo(torch.bfloat16).eps
    scale_a, scale_g = float(orc["v"].abs().max()), float(orc["g"].abs().max())
    assert_matches_oracle(sub, orc, sae, atol=64 * eps * (scale_a + scale_g), rtol=0.05, set_tol=64 * eps * scale_a)


def _sanitizer() -> str | None:
    cands = [shutil.which("compute-sanitizer")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            cands += [os.path.join(root, "bin", "compute-sanitizer"),
                      os.path.join(root, "compute-sanitizer", "compute-sanitizer")]
    return next((c for c in cands if c and os.path.isfile(c)), None)


SANITIZED = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, "tests")
    import gradsae
    from oracle import random_sae
    from gradsae.stats import LatentStats
    torch.manual_seed(0)
    for dtype, strategy in ((torch.float32, "chunked"), (torch.bfloat16, "chunked"), (torch.bfloat16, "fused")):
        os.environ["GRADSAE_STRATEGY"] = strategy
        for act in ("topk", "relu"):
            sae = random_sae(72, 700, act, k=40, dtype=dtype, device="cuda")
            x = torch.randn(67, 72, device="cuda", dtype=dtype)
            g = torch.randn_like(x)
            out = gradsae.influence(x, g, sae, backend="cuda")
            s = LatentStats(700, device="cuda")
            gradsae.accumulate_influence(x, g, sae, s, backend="cuda")
            gradsae.accumulate_influence(x, g, sae, s, backend="cuda", deterministic=True)
    sae = random_sae(72, 700, "topk", k=256, device="cuda")
    gradsae.influence(torch.randn(40, 72, device="cuda"), torch.randn(40, 72, device="cuda"), sae, backend="cuda")
    torch.cuda.synchronize()
    print("done")
""")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_clean(tool, tmp_path):
    san = _sanitizer()
    if san is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run.py"
    script.write_text(SANITIZED)
    res = subprocess.run([san, "--tool", tool, "--error-exitcode", "99", sys.executable, str(script)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report[-6000:]
    assert "done" in res.stdout and "ERROR SUMMARY: 0 errors" in report, report[-6000:]
