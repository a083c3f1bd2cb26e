"""SAE.from_object on live EleutherAI sparsify SparseCoders: encode, decode and influence equal
sparsify's own; groupmax and skip connections on autoencoders are refused by name (transcoders:
test_loading_transcoders.py)."""

import os

import pytest
import torch

# sparsify picks its Triton sparse decoder at import time when triton is installed; it needs
# CUDA tensors, and these tests use CPU float64 ones, so use its eager decoder (the same maths).
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[compat]')")

import gradsae  # noqa: E402
from gradsae.errors import InputError  # noqa: E402
from interop_helpers import assert_influence_matches_library, randomize  # noqa: E402

D_IN = 16


def make(**cfg_kw):
    cfg = sparsify.SparseCoderConfig(**cfg_kw)
    return randomize(sparsify.SparseCoder(D_IN, cfg, dtype=torch.float64))


def dense_latents(out, n_latents):
    """sparsify's (top_acts, top_indices) scattered into dense latents."""
    lead = out.top_acts.shape[:-1]
    z = torch.zeros(*lead, n_latents, dtype=out.top_acts.dtype)
    return z.scatter(-1, out.top_indices, out.top_acts).detach()


@pytest.mark.parametrize("cfg", [dict(num_latents=64, k=5), dict(expansion_factor=4, k=3, normalize_decoder=False)],
                         ids=["num_latents", "expansion_factor"])
def test_encode_decode_equal_sparsify(cfg):
    lib = make(**cfg)
    sae = gradsae.SAE.from_object(lib)
    assert (sae.d_in, sae.d_sae, sae.activation, sae.k) == (D_IN, lib.num_latents, "topk", lib.cfg.k)
    x = torch.randn(11, D_IN, dtype=torch.float64)
    out = lib.encode(x)
    z_lib = dense_latents(out, lib.num_latents)
    z = sae.encode(x)
    torch.testing.assert_close(z, z_lib, atol=1e-10, rtol=0)
    assert int((z_lib > 0).sum()) > 0
    torch.testing.assert_close(sae.decode(z), lib.decode(out.top_acts, out.top_indices).detach(), atol=1e-10, rtol=0)
    # the sparse path agrees with sparsify's (indices, values) decode as well
    idx, vals = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(idx, vals), lib.decode(out.top_acts, out.top_indices).detach(),
                               atol=1e-10, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), lib(x).sae_out, atol=1e-10, rtol=0)


def test_influence_equals_autograd_through_sparsify_decode():
    lib = make(num_latents=48, k=4)
    n = lib.num_latents

    def encode(x):
        return dense_latents(lib.encode(x), n)

    def decode(z):
        # sparsify decodes (values, indices); hand it the top-k of the dense latents so
        # autograd flows back to z through sparsify's own decoder
        vals, idx = z.topk(lib.cfg.k, dim=-1)
        return lib.decode(vals, idx)

    assert_influence_matches_library(lib, encode, decode, torch.randn(13, D_IN, dtype=torch.float64))


def test_unsupported_sparsify_configurations_are_refused():
    with pytest.raises(InputError, match="groupmax"):
        gradsae.SAE.from_object(make(num_latents=64, k=4, activation="groupmax"))
    with pytest.raises(InputError, match="skip"):
        gradsae.SAE.from_object(make(num_latents=64, k=4, skip_connection=True))
