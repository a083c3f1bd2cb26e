"""One NaN rule for every backend: a NaN pre-activation is never selected. It counts as an
inactive latent (as if its value were -inf): it never takes a top-k slot from a real value
and never passes a threshold. The op rejects NaN inputs by default (check_finite=True), but
NaN weights, or check_finite=False, still produce NaN pre-activations.

Checked here on every backend that runs without a GPU: the reference, the Triton kernels
under the interpreter (fused and chunked), and the CUDA selection logic (host builds, in
test_cuda_select.py and test_cuda_stream.py); the gpu-marked tests repeat it on a GPU."""

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, random_inputs, random_sae

import gradsae
from gradsae.op import Influence

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _nan_sae(activation, k=6, rescale=False):
    d_in, d_sae = 16, 300
    seed = int(torch.randint(0, 2**31 - 1, ()))
    sae = random_sae(d_in, d_sae, activation, k=k, rescale=rescale, device=DEV, seed=seed)
    ref = random_sae(d_in, d_sae, activation, k=k, rescale=rescale, device=DEV, seed=seed)  # the same weights
    nan_cols = torch.randperm(d_sae)[:40].to(DEV)
    sae.b_enc[nan_cols] = float("nan")
    ref.b_enc[nan_cols] = float("-inf")
    for s in (sae, ref):
        s._cache.clear()
    return sae, ref, nan_cols


def _backends():
    out = [pytest.param("reference", None)]
    try:
        import triton  # noqa: F401

        out += [pytest.param("triton", "fused"), pytest.param("triton", "chunked")]
    except ImportError:
        pass
    gpu = pytest.mark.gpu  # the CUDA extension's kernels (their logic is host-tested here)
    out += [pytest.param("cuda", "chunked", marks=gpu), pytest.param("cuda", "fused", marks=gpu)]
    return out


def _run(sae, x, g, backend, strategy, monkeypatch):
    """Through the op, with the encode strategy forced and several chunks of latents."""
    if strategy is not None:
        monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
        monkeypatch.setenv("GRADSAE_CHUNK_BYTES", str(x.shape[0] * 256 * 4))
    return gradsae.influence(x, g, sae, backend=backend, check_finite=False)


@pytest.mark.parametrize("backend,strategy", _backends())
@pytest.mark.parametrize("activation,rescale", [("topk", False), ("topk", True), ("jumprelu", False), ("relu", True)])
def test_nan_pre_activations_are_never_selected(monkeypatch, backend, strategy, activation, rescale):
    sae, ref, nan_cols = _nan_sae(activation, rescale=rescale)
    x, g = random_inputs((23,), sae.d_in, DEV)
    out = _run(sae, x, g, backend, strategy, monkeypatch)
    assert not bool(torch.isin(out.indices, nan_cols).any()), "a NaN latent was selected"
    assert bool(torch.isfinite(out.acts).all() and torch.isfinite(out.scores).all())
    # exactly what the same SAE selects when those latents' values are -inf
    want = dense_oracle(ref, x, g)
    res = Influence(out.indices, out.acts, out.grads, out.scores, sae.d_sae)
    assert_matches_oracle(res, want, ref, atol=2e-4, rtol=2e-4)
    if activation == "topk":
        assert out.K == sae.k and bool((out.indices >= 0).sum(-1).eq(
            (want["z"] > 0).sum(-1).to(out.indices.device)).all())


@pytest.mark.parametrize("activation,rescale", [("topk", False), ("topk", True), ("jumprelu", False), ("relu", True)])
def test_dense_encode_follows_the_nan_rule(activation, rescale):
    """SAE.encode / SAE.activate (the dense reference semantics) follow the same rule: a NaN
    pre-activation gives a 0 latent and never takes a top-k slot; the result is what the
    SAE with -inf there gives, and the float64 oracle of that SAE."""
    sae, ref, nan_cols = _nan_sae(activation, k=6, rescale=rescale)
    x, _ = random_inputs((31,), sae.d_in, DEV)
    z = sae.encode(x)
    assert bool(torch.isfinite(z).all()), "NaN leaked into the dense latents"
    assert bool((z[:, nan_cols] == 0).all())
    torch.testing.assert_close(z, ref.encode(x), rtol=0, atol=0)
    want = dense_oracle(ref, x, torch.zeros_like(x))["z"]
    torch.testing.assert_close(z.double().cpu(), want, rtol=1e-4, atol=1e-4)
    if activation == "topk":  # every row keeps its k largest real values
        assert bool(((z != 0).sum(-1) == (want != 0).sum(-1).to(z.device)).all())


def test_activate_on_nan_and_infinite_values():
    """activate() alone: NaN and -inf are inactive, +inf is the largest value; a row with
    fewer real values than k fills the rest with zeros, not NaN."""
    d_sae = 8
    v = torch.tensor([[float("nan"), 1.0, float("-inf"), 3.0, float("nan"), 2.0, float("inf"), -1.0],
                      [float("nan")] * 7 + [0.5]])
    topk = random_sae(4, d_sae, "topk", k=3)
    z = topk.activate(v)
    assert torch.equal(z[0], torch.tensor([0, 0, 0, 3.0, 0, 2.0, float("inf"), 0]))
    assert torch.equal(z[1], torch.tensor([0.0] * 7 + [0.5]))
    relu = random_sae(4, d_sae, "relu")
    z = relu.activate(v)
    assert torch.equal(z[0], torch.tensor([0, 1.0, 0, 3.0, 0, 2.0, float("inf"), 0]))
    assert torch.equal(z[1], torch.tensor([0.0] * 7 + [0.5]))
