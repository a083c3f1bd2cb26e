"""The Triton backend on a CUDA GPU at realistic shapes (compiled kernels, autotuned tiles),
against the float64 oracle and the reference backend. Skipped without a GPU.

Sized for one round of `make gpu-check` (under GRADSAE_AUTOTUNE=small every autotuned kernel
compiles two configurations): each case below adds kernels of a new kind (dtype, KP, decoder
scale, statistics) instead of repeating one; about 30 compiles in all. The KP=256 tier (the
largest merge networks, the slowest compiles) carries ``kp256`` in its id, which the check
deselects unless asked."""

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, random_sae, selection_tol

import gradsae

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _inputs(n, d_in, dtype, scale=2.0):
    x = (torch.randn(n, d_in, dtype=torch.float64) * scale).to(DEV, dtype)
    g = torch.randn(n, d_in, dtype=torch.float64).to(DEV, dtype)
    return x, g


@pytest.mark.parametrize("n,d_in,d_sae,k,rescale", [
    pytest.param(300, 768, 32768, 1, True, id="k1"),
    pytest.param(129, 2304, 16384, 64, False, id="k64"),
    pytest.param(5, 64, 1 << 21, 64, False, id="d_sae-2e21"),   # indices up to 2^21 (the k64 kernels)
    pytest.param(64, 8192, 4096, 37, True, id="widest-d_in"),
    pytest.param(64, 512, 16384, 256, True, id="kp256"),
])
def test_topk_fp32_matches_oracle(n, d_in, d_sae, k, rescale):
    torch.backends.cuda.matmul.allow_tf32 = False
    sae = random_sae(d_in, d_sae, "topk", k=k, rescale=rescale, device=DEV)
    x, g = _inputs(n, d_in, torch.float32)
    out = gradsae.influence(x, g, sae, backend="triton")
    assert out.K == k
    assert_matches_oracle(out, dense_oracle(sae, x, g), sae, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("dtype,activation,rescale,normalize", [
    (torch.bfloat16, "topk", False, "none"), (torch.bfloat16, "topk", True, "layer_norm"),
    (torch.bfloat16, "jumprelu", False, "none"), (torch.bfloat16, "relu", False, "constant_norm_rescale"),
    (torch.float16, "topk", False, "none"),
])
def test_half_precision_within_twice_reference(dtype, activation, rescale, normalize):
    d_in, d_sae, n = 2304, 16384, 200
    sae = random_sae(d_in, d_sae, activation, k=64, rescale=rescale, normalize=normalize, dtype=dtype, device=DEV)
    if activation == "relu":  # keep rows sparse enough for a realistic capacity
        sae.b_enc -= 1.0
    x, g = _inputs(n, d_in, dtype)
    orc = dense_oracle(sae, x, g)
    out = gradsae.influence(x, g, sae, backend="triton")
    ref = gradsae.influence(x, g, sae, backend="reference")
    e_t, e_r = max_errors(out, orc), max_errors(ref, orc)
    for f in ("acts", "grads", "scores"):
        assert e_t[f] <= 2 * e_r[f] + 1e-3, (f, e_t, e_r)
    assert_matches_oracle(out, orc, sae, atol=0.1, rtol=0.05, set_tol=max(0.1, selection_tol(sae, x, orc)))


def test_threshold_capacity_and_overflow_on_gpu():
    sae = random_sae(768, 24576, "jumprelu", device=DEV)
    x, g = _inputs(513, 768, torch.float32)
    orc = dense_oracle(sae, x, g)
    fullest = int((orc["z"] != 0).sum(-1).max())
    with pytest.raises(gradsae.CapacityError, match=f"has {fullest} active latents"):
        gradsae.influence(x, g, sae, k=fullest - 1, backend="triton")
    out = gradsae.influence(x, g, sae, backend="triton")
    assert out.K == fullest
    assert_matches_oracle(out, orc, sae, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_stats_on_gpu(deterministic):
    sae = random_sae(1024, 32768, "topk", k=64, dtype=torch.bfloat16, device=DEV)
    x, g = _inputs(1000, 1024, torch.bfloat16)
    mask = torch.rand(1000, device=DEV) > 0.2
    a = gradsae.accumulate_influence(x, g, sae, mask=mask, backend="triton", deterministic=deterministic)
    upd = gradsae.LatentStats(sae.d_sae, device=DEV).update(gradsae.influence(x, g, sae, backend="triton"), mask)
    assert torch.equal(a.count, upd.count) and torch.equal(a.score_max, upd.score_max)
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum"):
        torch.testing.assert_close(getattr(a, f), getattr(upd, f), atol=1e-7, rtol=1e-9)
    if deterministic:
        b = gradsae.accumulate_influence(x, g, sae, mask=mask, backend="triton", deterministic=True)
        assert a == b


def test_sparse_decode_on_gpu():
    from gradsae.backends import get_backend

    sae = random_sae(2304, 16384, "topk", k=64, rescale=True, dtype=torch.bfloat16, device=DEV)
    x, _ = _inputs(300, 2304, torch.bfloat16)
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    got = get_backend("triton").decode_sparse(sae, idx, acts)
    want = sae.to(dtype=torch.float64).decode_sparse(idx, acts.double())
    ref = sae.decode_sparse(idx, acts)
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().max()  # the output's own rounding
    assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + ulp
