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


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("activation,k", [("topk", 5), ("jumprelu", None)])
def test_both_strategies_through_the_op(monkeypatch, strategy, activation, k):
    """GRADSAE_STRATEGY forces the strategy; each runs its own kernels and answers the op
    (threshold SAEs: counts behind the capacity retry, k=None) as the float64 oracle does."""
    from oracle import assert_matches_oracle, dense_oracle, random_inputs

    from gradsae.backends import chunked, triton_backend
    from gradsae.op import capacity

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    monkeypatch.setenv("GRADSAE_CHUNK_BYTES", str(11 * 256 * 4))  # 2 chunks of latents
    monkeypatch.setattr(capacity, "INITIAL_CAPACITY", 2)  # a second pass at the exact size
    ran = []
    real = chunked.select
    monkeypatch.setattr(triton_backend.chunked, "select", lambda req, folds: ran.append(req.k) or real(req, folds))
    sae = random_sae(12, 400, activation, k=k or 8, rescale=True, device=dev)
    x, g = random_inputs((11,), sae.d_in, dev)
    out = gradsae.influence(x, g, sae, backend="triton")
    orc = dense_oracle(sae, x, g)
    assert_matches_oracle(out, orc, sae, atol=1e-4, rtol=1e-4)
    assert bool(ran) == (strategy == "chunked")
    if activation != "topk":
        assert out.K == max(1, int((orc["z"] != 0).sum(-1).max()))
        if strategy == "chunked":
            assert ran[0] == 2 and (len(ran) == 1 or ran[1] == out.K)
