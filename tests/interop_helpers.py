"""Shared checks for the tests against other libraries' live objects (test_interop_*.py)."""

from __future__ import annotations

import torch

import gradsae


def randomize(module: torch.nn.Module, *, small: tuple[str, ...] = ("r_mag",)) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` with N(0, 1) values (0.3 x N(0, 1) for names
    in ``small``, e.g. gated ``r_mag`` whose exp() would otherwise blow up)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if name.split(".")[-1] in small else 1.0
            p.copy_(torch.randn_like(p) * scale)
    return module


def library_scores(encode, decode, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Dense ``z * dY/dz`` with ``Y = sum(decode(z) * grad)``, by autograd through the library's
    own ``decode`` (``encode`` runs first, so decoders that keep normalisation state work)."""
    z = encode(x).detach().clone().requires_grad_(True)
    (decode(z) * grad).sum().backward()
    return (z * z.grad).detach()


def assert_encode_decode_equal(sae: gradsae.SAE, encode, decode, x: torch.Tensor, *, atol: float = 1e-10):
    """``sae``'s dense latents and reconstruction equal the library's ``encode``/``decode``."""
    z_lib = encode(x).detach()
    z = sae.encode(x)
    assert z.shape == z_lib.shape
    torch.testing.assert_close(z, z_lib, atol=atol, rtol=0)
    # the library did activate something, and not everything
    assert 0 < int((z_lib != 0).sum()) < z_lib.numel()
    torch.testing.assert_close(sae.decode(z, x), decode(z_lib).detach(), atol=atol, rtol=0)


def assert_influence_matches_library(sae, encode, decode, x: torch.Tensor, *, atol: float = 1e-10):
    """``gradsae.influence`` (fed ``sae``, which may be the live library object itself) gives
    the scores autograd gives through the library's own decode."""
    grad = torch.randn_like(x)
    want = library_scores(encode, decode, x, grad)
    got = gradsae.influence(x, grad, sae).to_dense("scores")
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-8)
    assert int((want != 0).sum()) > 0


def assert_same_sae(a: gradsae.SAE, b: gradsae.SAE, *, atol: float = 0.0, rtol: float = 0.0):
    """Two gradsae SAEs are the same SAE: equal weights (exactly, by default), thresholds and
    options."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        x, y = getattr(a, name), getattr(b, name)
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    assert (a.activation, a.k, a.apply_b_dec_to_input, a.normalize_activations, a.rescale_acts_by_decoder_norm) == (
        b.activation, b.k, b.apply_b_dec_to_input, b.normalize_activations, b.rescale_acts_by_decoder_norm)
    if a.threshold is None or b.threshold is None:
        assert a.threshold is None and b.threshold is None
    else:
        torch.testing.assert_close(a.selection_threshold(), b.selection_threshold(), atol=atol, rtol=rtol)
