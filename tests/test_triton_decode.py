"""Triton sparse decode (the splice forward) against SAE.decode on dense latents, and its
backward (the gather-dot) against the float64 oracle's dY/dz."""

import pytest
import torch
from oracle import dense_oracle, random_sae

import gradsae
from gradsae.backends import get_backend

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("activation,normalize,rescale", [
    ("topk", "none", False), ("topk", "layer_norm", True), ("jumprelu", "constant_norm_rescale", False),
])
def test_sparse_decode_matches_dense_decode(activation, normalize, rescale):
    sae = random_sae(40, 150, activation, k=7, normalize=normalize, rescale=rescale, device=DEV)
    x = torch.randn(3, 5, 40, device=DEV) * 2
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    tb = get_backend("triton")
    x_hat = sae.norm_state(x).apply(tb.decode_sparse(sae, idx, acts))
    assert x_hat.shape == x.shape and x_hat.dtype == sae.dtype
    # float64 dense decode of the same latents
    sae64 = sae.to(dtype=torch.float64)
    z = torch.zeros(3, 5, 150, dtype=torch.float64, device=DEV)
    z.scatter_add_(-1, idx.clamp(min=0), torch.where(idx >= 0, acts.double(), torch.zeros_like(acts.double())))
    want = sae64.decode(z, x.double())
    torch.testing.assert_close(x_hat.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rescale", [False, True])
def test_sparse_decode_backward_is_the_gather_dot(rescale):
    """d(sum(x_hat * G))/d acts equals the oracle's dY/dz for the selected latents."""
    sae = random_sae(24, 100, "topk", k=6, rescale=rescale, device=DEV)
    x = torch.randn(9, 24, device=DEV)
    G = torch.randn(9, 24, device=DEV)
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    acts = acts.clone().requires_grad_(True)
    out = get_backend("triton").decode_sparse(sae, idx, acts)
    (out * G).sum().backward()
    orc = dense_oracle(sae, x, G)
    want = orc["g"].gather(-1, idx.cpu().clamp(min=0)) * (idx.cpu() >= 0)
    torch.testing.assert_close(acts.grad.cpu().double(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_low_precision(dtype):
    """fp32 accumulation: no worse than twice the error of torch's embedding_bag decode in
    the same dtype (SAE.decode_sparse)."""
    sae = random_sae(64, 200, "topk", k=32, dtype=dtype, device=DEV)
    x = torch.randn(6, 64, device=DEV).to(dtype)
    idx, acts = gradsae.encode_sparse(x, sae, backend="triton")
    got = get_backend("triton").decode_sparse(sae, idx, acts)
    ref = sae.decode_sparse(idx, acts)
    sae64 = sae.to(dtype=torch.float64)
    want = sae64.decode_sparse(idx, acts.double())
    e_got = (got.double() - want).abs().max()
    e_ref = (ref.double() - want).abs().max()
    # both are dominated by the final rounding to ``dtype``: allow one ulp of the output
    ulp = torch.finfo(dtype).eps * want.abs().max()
    assert e_got <= 2 * e_ref + ulp
