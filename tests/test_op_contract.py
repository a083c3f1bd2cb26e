"""The influence op's contract: input checks, empty input, and backend dispatch."""

import pytest
import torch
from oracle import random_sae

import gradsae
from gradsae.op import (
    PRIORITY,
    Request,
    choose_backend,
    dispatch,
    get_backend,
    register_backend,
    unregister_backend,
)


@pytest.fixture
def sae():
    return random_sae(8, 32, "topk", k=4)


def test_shape_and_d_in_errors(sae):
    x = torch.randn(3, 8)
    with pytest.raises(gradsae.InputError, match="d_in=8"):
        gradsae.influence(torch.randn(3, 9), torch.randn(3, 9), sae)
    with pytest.raises(gradsae.InputError, match="grad has shape"):
        gradsae.influence(x, torch.randn(4, 8), sae)
    with pytest.raises(gradsae.InputError, match="torch.Tensor"):
        gradsae.influence(x.numpy(), x, sae)


def test_dtype_and_device_errors(sae):
    x = torch.randn(3, 8)
    with pytest.raises(gradsae.InputError, match="pass both in one dtype"):
        gradsae.influence(x, x.double(), sae)
    with pytest.raises(gradsae.InputError, match="floating-point"):
        gradsae.influence(x.long(), x.long(), sae)
    with pytest.raises(gradsae.InputError, match="is on meta but the SAE is on cpu"):
        gradsae.influence(x.to("meta"), x.to("meta"), sae)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(sae, bad):
    x = torch.randn(3, 8)
    y = x.clone()
    y[1, 2] = bad
    with pytest.raises(gradsae.InputError, match="x contains NaN or infinite"):
        gradsae.influence(y, x, sae)
    with pytest.raises(gradsae.InputError, match="grad contains NaN or infinite"):
        gradsae.influence(x, y, sae)


def test_bad_k(sae):
    x = torch.randn(3, 8)
    for k in (0, -2, 1.5, True):
        with pytest.raises(gradsae.InputError, match="k must be"):
            gradsae.influence(x, x, sae, k=k)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_input_gives_empty_result(sae, lead):
    x = torch.randn(*lead, 8)
    out = gradsae.influence(x, x, sae)
    assert out.indices.shape == (*lead, 4) and out.scores.shape == (*lead, 4)
    idx, vals = gradsae.encode_sparse(x, sae)
    assert idx.shape == (*lead, 4)


def test_unknown_backend_lists_registered(sae):
    x = torch.randn(2, 8)
    with pytest.raises(gradsae.BackendError, match="unknown backend 'nope'.*reference"):
        gradsae.influence(x, x, sae, backend="nope")


class _Picky:
    """A backend that serves nothing, to check the dispatch rules."""

    name = "picky"

    def unsupported(self, req):
        return "only serves requests on the moon"

    def select(self, req):  # never called: it serves nothing
        raise AssertionError("picky was asked to serve")

    influence = select


class _Echo:
    """A backend that serves everything by delegating to the reference, counting calls."""

    name = "echo"

    def __init__(self):
        self.calls = 0

    def unsupported(self, req):
        return None if req.x.shape[0] < 100 else "more than 100 rows"

    def influence(self, req):
        self.calls += 1
        return get_backend("reference").influence(req)

    def select(self, req):
        return get_backend("reference").select(req)


@pytest.fixture
def extra_backends():
    picky, echo = _Picky(), _Echo()
    register_backend(picky, priority=0)
    register_backend(echo, priority=1)
    yield picky, echo
    unregister_backend("picky")
    unregister_backend("echo")


def test_priority_list_and_reasons(sae, extra_backends):
    picky, echo = extra_backends
    x = torch.randn(5, 8)
    out = gradsae.influence(x, x, sae)  # picky refuses, echo serves
    assert echo.calls == 1
    ref = gradsae.influence(x, x, sae, backend="reference")
    torch.testing.assert_close(out.scores, ref.scores)
    big = torch.randn(150, 8)
    gradsae.influence(big, big, sae)  # echo refuses: reference serves
    assert echo.calls == 1
    with pytest.raises(gradsae.BackendError, match="backend 'picky' cannot serve.*moon"):
        gradsae.influence(x, x, sae, backend="picky")


def test_auto_with_nobody_lists_every_reason(sae, extra_backends, monkeypatch):
    monkeypatch.setattr(dispatch, "_order", ["picky", "echo"])
    req = Request(torch.randn(200, 8), torch.randn(200, 8), sae, 4)
    with pytest.raises(gradsae.BackendError) as e:
        choose_backend(req)
    assert "picky: only serves requests on the moon" in str(e.value)
    assert "echo: more than 100 rows" in str(e.value)


def test_sae_dtype_differs_from_inputs():
    """A float32 SAE takes bfloat16 inputs (cast like SAELens does) and reports float32."""
    sae = random_sae(8, 32, "topk", k=4)
    x = torch.randn(3, 8).bfloat16()
    out = gradsae.influence(x, x, sae)
    assert out.scores.dtype == torch.float32
    ref = gradsae.influence(x.float(), x.float(), sae)
    torch.testing.assert_close(out.scores, ref.scores)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_k_beyond_d_sae_is_refused(activation):
    sae = random_sae(8, 32, activation, k=4)
    x = torch.randn(3, 8)
    with pytest.raises(gradsae.InputError, match=r"k=5000 is more than the SAE's d_sae=32 latents.*pass k <= 32"):
        gradsae.influence(x, x, sae, k=5000)
    with pytest.raises(gradsae.InputError, match="k=33 is more than"):
        gradsae.encode_sparse(x, sae, k=33)
    with pytest.raises(gradsae.InputError, match="k=33 is more than"):
        gradsae.accumulate_influence(x, x, sae, k=33)
    assert gradsae.influence(x, x, sae, k=32).K == 32


def test_lossy_input_cast_warns_once(monkeypatch):
    """float64 inputs to a float32 SAE are encoded in float32: one GradSAEWarning says so;
    widening casts (bfloat16 inputs) say nothing."""
    from gradsae.op import api as op

    monkeypatch.setattr(op, "_warned_casts", set())
    sae = random_sae(8, 32, "topk", k=4)
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.warns(gradsae.GradSAEWarning, match=r"inputs are torch.float64 but the SAE's weights are "
                                                    r"torch.float32.*sae.to\(dtype=torch.float64\)"):
        out = gradsae.influence(x, x, sae)
    torch.testing.assert_close(out.scores, gradsae.influence(x.float(), x.float(), sae).scores)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradsae.influence(x, x, sae)  # once only
        gradsae.encode_sparse(x, sae)
        gradsae.influence(x.bfloat16(), x.bfloat16(), sae)  # lossless: silent


def _params(fn):
    import inspect

    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", [n for n, _ in PRIORITY])
def test_builtin_backends_keep_the_protocols_signatures(name):
    """One signature per method: every built-in backend has the required methods and, for
    each optional one it has, exactly the parameters the protocol declares."""
    from gradsae.op import contract

    cls = type(get_backend(name))
    assert cls.name == name
    for m in ("unsupported", "select", "influence"):
        assert _params(getattr(cls, m)) == _params(getattr(contract.Backend, m)), (name, m)
    for m, proto in contract.OPTIONAL.items():
        if hasattr(cls, m):
            assert _params(getattr(cls, m)) == _params(getattr(proto, m)), (name, m)
    have = {m for m in contract.OPTIONAL if hasattr(cls, m)}
    assert have == {"reference": {"gather_dot"},
                    "triton": {"gather_dot", "decode_sparse", "accumulate", "describe", "strategies"},
                    "cuda": {"gather_dot", "accumulate", "describe", "strategies"}}[name]
