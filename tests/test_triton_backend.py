"""Dispatch rules of the Triton backend: what it serves, what it refuses and why."""

import pytest
import torch
from oracle import random_sae

import gradsae
from gradsae.backends import Request, explain, get_backend

pytest.importorskip("triton")


def _req(sae, n=3, k=None, explicit=False):
    x = torch.randn(n, sae.d_in, dtype=sae.dtype, device=sae.device)
    return Request(x, x, sae, k if k is not None else sae.k, explicit=explicit)


def test_registered_and_described():
    assert "triton" in gradsae.available_backends()
    info = get_backend("triton").describe()
    assert info["name"] == "triton" and info["available"] is True and "triton" in info


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch rules")
def test_auto_never_picks_the_interpreter_but_explicit_works():
    sae = random_sae(8, 30, "topk", k=3)
    why = explain(_req(sae))["triton"]
    assert why is not None and "backend='triton'" in why
    assert get_backend("triton").unsupported(_req(sae, explicit=True)) is None
    x = torch.randn(4, 8)
    a = gradsae.influence(x, x, sae)  # auto -> reference
    b = gradsae.influence(x, x, sae, backend="triton")
    assert torch.equal(a.indices, b.indices)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch rules")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sae = random_sae(8, 30, "topk", k=3)
    assert get_backend("triton").unsupported(_req(sae, explicit=True)) == \
        "tensors are on cpu and TRITON_INTERPRET is not set"
    with pytest.raises(gradsae.BackendError, match="TRITON_INTERPRET is not set"):
        gradsae.influence(torch.randn(2, 8), torch.randn(2, 8), sae, backend="triton")


def test_unsupported_dtype_and_k():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sae64 = random_sae(8, 30, "topk", k=3, dtype=torch.float64, device=dev)
    assert "dtype torch.float64 unsupported" in get_backend("triton").unsupported(_req(sae64, explicit=True))
    with pytest.raises(gradsae.BackendError, match="float64 unsupported"):
        gradsae.influence(torch.randn(2, 8, dtype=torch.float64, device=dev),
                          torch.randn(2, 8, dtype=torch.float64, device=dev), sae64, backend="triton")
    sae = random_sae(8, 400, "topk", k=300, device=dev)
    assert get_backend("triton").unsupported(_req(sae, explicit=True)) == "k=300 > 256"
    # threshold capacities are not bounded by the top-k width
    thr = random_sae(8, 400, "jumprelu", device=dev)
    assert get_backend("triton").unsupported(_req(thr, k=300, explicit=True)) is None


def test_auto_falls_back_to_reference_for_unsupported_dtype():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sae64 = random_sae(8, 30, "topk", k=3, dtype=torch.float64, device=dev)
    x = torch.randn(2, 8, dtype=torch.float64, device=dev)
    out = gradsae.influence(x, x, sae64)  # served by a capable backend, no error
    assert out.K == 3
