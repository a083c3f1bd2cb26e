"""gradsae.SAE: dense and sparse encode/decode against independent formulas, and its checks."""

import math

import pytest
import torch
from oracle import dense_oracle, random_sae

import gradsae


@pytest.mark.parametrize("activation,rescale", [("topk", False), ("topk", True), ("jumprelu", False), ("relu", False)])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
def test_encode_matches_oracle(activation, rescale, normalize):
    sae = random_sae(20, 70, activation, k=6, normalize=normalize, rescale=rescale, dtype=torch.float64)
    x = torch.randn(9, 20, dtype=torch.float64)
    z = sae.encode(x)
    orc = dense_oracle(sae, x, torch.zeros_like(x))
    torch.testing.assert_close(z, orc["z"])


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("rescale", [False, True])
def test_decode_inverts_normalisation(normalize, rescale):
    """decode(z, x) written independently: x_hat = (z / ||W_dec|| if rescale) @ W_dec + b_dec,
    then the normalisation's inverse with the statistics of x."""
    sae = random_sae(16, 48, "topk", k=5, normalize=normalize, rescale=rescale, dtype=torch.float64)
    x = torch.randn(7, 16, dtype=torch.float64) * 3 + 1
    z = sae.encode(x)
    zz = z / sae.W_dec.norm(dim=-1) if rescale else z
    x_hat = zz @ sae.W_dec + sae.b_dec
    if normalize == "constant_norm_rescale":
        x_hat = x_hat * (x.norm(dim=-1, keepdim=True) / math.sqrt(16))
    elif normalize == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        x_hat = x_hat * (x - mu).std(-1, keepdim=True) + mu
    torch.testing.assert_close(sae.decode(z, x), x_hat)
    torch.testing.assert_close(sae(x), x_hat)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_sparse_encode_decode_equal_dense(activation):
    sae = random_sae(16, 120, activation, k=7, normalize="layer_norm", dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    idx, vals = sae.encode_sparse(x)
    assert idx.shape[:-1] == (3, 5) and idx.dtype == torch.int64
    dense = torch.zeros(3, 5, 121, dtype=torch.float64)
    dense.scatter_add_(-1, torch.where(idx >= 0, idx, 120), vals)
    torch.testing.assert_close(dense[..., :120], sae.encode(x))
    torch.testing.assert_close(sae.decode_sparse(idx, vals, x), sae.decode(sae.encode(x), x))


def test_jumprelu_threshold_is_strict_and_clamped_at_zero():
    d_in, d_sae = 4, 3
    W_enc = torch.eye(d_in, d_sae, dtype=torch.float64)
    sae = gradsae.SAE(W_enc, torch.zeros(d_sae, dtype=torch.float64), W_enc.T.clone(),
                      torch.zeros(d_in, dtype=torch.float64), "jumprelu",
                      threshold=torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), apply_b_dec_to_input=False)
    x = torch.tensor([[0.5, -0.5, 0.25, 9.0], [0.6, 0.1, -0.0, 9.0]], dtype=torch.float64)
    z = sae.encode(x)
    # latent 0: 0.5 is not > 0.5; 0.6 is. latent 1: threshold -1 but relu still applies.
    assert z.tolist() == [[0.0, 0.0, 0.25], [0.6, 0.1, 0.0]]


def test_batchtopk_alias_and_scalar_threshold():
    sae = random_sae(8, 30, "batchtopk", scalar_threshold=True)
    assert sae.activation == "jumprelu" and sae.threshold.shape == (30,)
    assert bool((sae.threshold == sae.threshold[0]).all())
    with pytest.raises(gradsae.InputError, match="threshold"):
        gradsae.SAE(torch.zeros(4, 6), torch.zeros(6), torch.zeros(6, 4), torch.zeros(4), "batchtopk")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(W_dec=torch.zeros(5, 4)), "W_dec has shape"),
        (dict(b_enc=torch.zeros(5)), "b_enc has shape"),
        (dict(b_dec=torch.zeros(3)), "b_dec has shape"),
        (dict(activation="gelu"), "unknown activation"),
        (dict(k=None), "needs k"),
        (dict(k=0), "k must be >= 1"),
        (dict(normalize_activations="rms"), "normalize_activations"),
        (dict(W_enc=torch.zeros(4, 6, dtype=torch.int32)), "floating point"),
    ],
)
def test_constructor_errors(kwargs, match):
    base = dict(W_enc=torch.zeros(4, 6), b_enc=torch.zeros(6), W_dec=torch.zeros(6, 4), b_dec=torch.zeros(4),
                activation="topk", k=2)
    base.update(kwargs)
    with pytest.raises(gradsae.InputError, match=match):
        gradsae.SAE(**base)


def test_to_changes_dtype_and_keeps_options():
    sae = random_sae(8, 20, "topk", k=3, normalize="layer_norm", rescale=True)
    s2 = sae.to(dtype=torch.float64)
    assert s2.dtype == torch.float64 and s2.k == 3 and s2.rescale_acts_by_decoder_norm
    assert s2.normalize_activations == "layer_norm"
    x = torch.randn(3, 8)
    torch.testing.assert_close(s2.encode(x.double()).float(), sae.encode(x), atol=1e-5, rtol=1e-5)


def test_decode_requires_x_when_normalised():
    sae = random_sae(8, 20, "topk", k=3, normalize="constant_norm_rescale")
    with pytest.raises(gradsae.InputError, match="needs the input x"):
        sae.decode(torch.zeros(2, 20))


def test_cache_follows_in_place_weight_edits():
    sae = random_sae(8, 20, "topk", k=3, rescale=True, dtype=torch.float64)
    n0 = sae.decoder_norm().clone()
    sae.W_dec.mul_(2)
    torch.testing.assert_close(sae.decoder_norm(), 2 * n0)


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_zero_rows_stay_finite(normalize):
    """Masked pad positions are zero rows: encode/decode/influence must stay finite there."""
    sae = random_sae(8, 30, "topk", k=3, normalize=normalize)
    x = torch.randn(4, 8)
    x[1] = 0
    assert bool(torch.isfinite(sae.encode(x)).all())
    assert bool(torch.isfinite(sae(x)).all())
    out = gradsae.influence(x, torch.randn_like(x), sae)
    assert bool(torch.isfinite(out.scores).all())


def test_decode_sparse_dispatches_to_a_kernel_when_asked():
    """backend='triton' (interpreter on CPU) gives the PyTorch decode; a backend without a
    sparse decode is refused by name."""
    sae = random_sae(16, 70, "topk", k=5, rescale=True, normalize="layer_norm")
    x = torch.randn(3, 4, 16)
    idx, vals = sae.encode_sparse(x)
    want = sae.decode_sparse(idx, vals, x)  # CPU auto: PyTorch path
    got = sae.decode_sparse(idx, vals, x, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(gradsae.BackendError, match="has no decode_sparse"):
        sae.decode_sparse(idx, vals, x, backend="reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
def test_non_finite_weights_are_refused_at_construction(name, bad):
    """NaN/inf weights would give NaN scores and empty selections: refused, naming the tensor
    and the count; check_finite=False builds the SAE anyway."""
    w = dict(W_enc=torch.randn(4, 6), b_enc=torch.randn(6), W_dec=torch.randn(6, 4), b_dec=torch.randn(4),
             threshold=torch.rand(6))
    w[name].view(-1)[1] = bad
    with pytest.raises(gradsae.InputError, match=rf"{name} has 1 NaN or infinite entries \(of {w[name].numel()}\)"
                       r".*check_finite=False"):
        gradsae.SAE(activation="jumprelu", **w)
    sae = gradsae.SAE(activation="jumprelu", check_finite=False, **w)
    assert not bool(torch.isfinite(getattr(sae, name)).all())


def test_a_cast_that_overflows_is_refused():
    sae = random_sae(8, 20, "topk", k=3)
    sae.W_dec[2, 3] = 1e6  # beyond float16's range
    with pytest.raises(gradsae.InputError, match="W_dec has 1 NaN or infinite"):
        sae.to(dtype=torch.float16)
    assert sae.to(dtype=torch.float64).dtype == torch.float64  # widening is fine


def test_topk_k_larger_than_d_sae_is_refused():
    with pytest.raises(gradsae.InputError, match=r"k=5000 is more than the SAE's d_sae=1024 latents.*k <= 1024"):
        gradsae.SAE(torch.zeros(8, 1024), torch.zeros(1024), torch.zeros(1024, 8), torch.zeros(8), "topk", k=5000)
    sae = gradsae.SAE(torch.zeros(8, 1024), torch.zeros(1024), torch.zeros(1024, 8), torch.zeros(8), "topk", k=1024)
    assert sae.k == 1024


def test_sparse_round_trip_is_the_dense_decode():
    """linear_decode_sparse (the one embedding-bag decode) against the dense decode of the same
    latents in float64."""
    sae = random_sae(16, 70, "jumprelu", rescale=True, normalize="layer_norm", dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    idx, vals = sae.encode_sparse(x)
    z = torch.zeros(2, 5, 70, dtype=torch.float64).scatter_add_(-1, idx.clamp(min=0), vals * (idx >= 0))
    torch.testing.assert_close(sae.decode_sparse(idx, vals, x), sae.decode(z, x), rtol=1e-12, atol=1e-12)
    d = dense_oracle(sae, x, torch.zeros_like(x))
    torch.testing.assert_close(z.reshape(-1, 70), d["z"], rtol=1e-12, atol=1e-12)
