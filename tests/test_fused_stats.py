"""The statistics fed straight from the splice's backward (gradsae.op.accumulate_at, a
recording's statistics sink, the corpus runner where a kernel backend serves) against the
plain path (Influence, then LatentStats.update): counts and maxima exactly, sums to float64
rounding, the same tokens and the same influence. Run here with the Triton kernels under the
interpreter and with the NumPy stand-in for gradsae._C; the CUDA kernels themselves are
compared with the oracle by the gpu tests."""

from __future__ import annotations

import random

import pytest
import tiny_models as tm
import torch
from oracle import random_sae
from test_cuda_orchestration import fake  # noqa: F401 - the stand-in for gradsae._C (a fixture)

import gradsae
from gradsae.corpus import run as corpus_run
from gradsae.op import accumulate_at, fused_backend, get_backend, influence_at
from gradsae.stats import FIELDS, SUM_FIELDS, LatentStats

triton = pytest.importorskip("triton")


def assert_same_stats(got: LatentStats, want: LatentStats) -> None:
    assert got.tokens == want.tokens
    assert torch.equal(got.count, want.count)
    assert torch.equal(got.score_max, want.score_max)
    # the same float32 terms, added in another order: equal to float64 rounding
    scale = max(1.0, float(want.abs_sum.max()), float(want.act_sum.abs().max()))
    for f in SUM_FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=1e-12, atol=1e-13 * scale, msg=f)


def _inputs(sae, lead, dtype=torch.float32):
    x = (torch.randn(*lead, sae.d_in) * 2).to(dtype)
    g = torch.randn(*lead, sae.d_in).to(dtype)
    return x, g


FUSED_CALLS: list = []


@pytest.fixture(params=["triton", "cuda"])
def backend(request, monkeypatch):
    """A kernel backend serving CPU tensors: Triton under the interpreter (named explicitly),
    or the cuda backend over the NumPy stand-in; its fused accumulate records its calls."""
    if request.param == "cuda":
        request.getfixturevalue("fake")
    b = get_backend(request.param)
    real = b.accumulate

    def spy(req, sel, tables, mask, keep_grads=False):
        FUSED_CALLS.append((request.param, keep_grads, req.deterministic))
        return real(req, sel, tables, mask, keep_grads=keep_grads)

    monkeypatch.setattr(b, "accumulate", spy)
    FUSED_CALLS.clear()
    return request.param


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("activation,normalize,rescale", [("topk", "none", True), ("topk", "layer_norm", False),
                                                          ("relu", "constant_norm_rescale", True)])
def test_accumulate_at_equals_influence_at_plus_update(backend, deterministic, activation, normalize, rescale):
    sae = random_sae(16, 200, activation, k=6, normalize=normalize, rescale=rescale)
    x, g = _inputs(sae, (3, 7))
    idx, acts = gradsae.encode_sparse(x, sae, k=None if activation == "topk" else 200, backend="reference")
    mask = torch.rand(3, 7) > 0.3
    assert fused_backend(sae, "cpu", backend) == backend
    got = LatentStats(sae.d_sae)
    inf = accumulate_at(idx, acts, g, sae, got, mask, x=x, backend=backend, deterministic=deterministic)
    assert FUSED_CALLS == [(backend, True, deterministic)]  # one fused pass, grads kept
    plain = influence_at(idx, acts, g, sae, x=x, backend=backend)
    want = LatentStats(sae.d_sae).update(plain, mask)
    assert_same_stats(got, want)
    for f in ("indices", "acts", "grads", "scores"):
        assert torch.equal(getattr(inf, f), getattr(plain, f)), f
    # twice into the same tables: they add up
    accumulate_at(idx, acts, g, sae, got, mask, x=x, backend=backend, deterministic=deterministic)
    assert torch.equal(got.count, 2 * want.count) and got.tokens == 2 * int(mask.sum())


def test_fused_backend_and_the_pytorch_form():
    """Without a kernel backend (the CPU, auto) the op's PyTorch form serves accumulate_at:
    the result is influence_at's and the tables are LatentStats.update's, bit for bit."""
    sae = random_sae(16, 120, "topk", k=5)
    assert fused_backend(sae, "cpu") is None and fused_backend(sae, "cpu", "reference") is None
    x, g = _inputs(sae, (9,))
    idx, acts = gradsae.encode_sparse(x, sae)
    got = LatentStats(sae.d_sae)
    inf = accumulate_at(idx, acts, g, sae, got)
    want = LatentStats(sae.d_sae).update(influence_at(idx, acts, g, sae))
    assert got == want and torch.equal(inf.scores, influence_at(idx, acts, g, sae).scores)
    with pytest.raises(gradsae.InputError, match="mask has shape"):
        accumulate_at(idx, acts, g, sae, got, torch.ones(3, dtype=torch.bool))
    with pytest.raises(gradsae.InputError, match="stats have d_sae=7"):
        accumulate_at(idx, acts, g, sae, LatentStats(7))


LAYER, D, DSAE, K = 1, 32, 64, 4


def test_recording_sink_equals_update_of_the_attribution(backend):
    """GradSAE.attribute with a statistics sink: the backward fills it as LatentStats.update
    of the returned attribution would (pad positions excluded), and the attribution is the
    one without a sink."""
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tm.model("gpt2", d=D, layers=2, seed=seed, scale=3.0)
    sae = random_sae(D, DSAE, "topk", k=K, seed=seed + 1)
    tok = tm.tokenizer()
    texts = [" ".join(random.Random(seed + i).choice(tm.WORDS) for _ in range(n)) for i, n in enumerate((9, 4, 7))]
    scorer = gradsae.GradSAE(model, sae, hook=f"blocks.{LAYER}.hook_resid_post", backend=backend)
    batch = tok(texts, return_tensors="pt", padding=True)
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert not bool(am.all())  # some pads
    sink = LatentStats(DSAE)
    att = scorer.attribute(ids, am, objective="loss", stats=sink)
    assert FUSED_CALLS == [(backend, True, False)]
    plain = scorer.attribute(ids, am, objective="loss")
    assert len(FUSED_CALLS) == 1
    assert_same_stats(sink, LatentStats(DSAE).update(plain.influence, plain.mask))
    assert sink.tokens == int(am.sum())
    for f in ("indices", "acts", "grads", "scores"):
        assert torch.equal(getattr(att.influence, f), getattr(plain.influence, f)), f


def _corpus(rng, n=10):
    return [" ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_corpus_runner_feeds_the_tables_from_the_backward(monkeypatch, backend):
    """score_corpus with a kernel backend (Triton under the interpreter) takes the fused path,
    batch by batch, and ends with the plain path's statistics and examples."""
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tm.model("gpt2", d=D, layers=2, seed=seed, scale=3.0)
    sae = random_sae(D, DSAE, "topk", k=K, seed=seed + 1)
    tok = tm.tokenizer()
    docs = _corpus(random.Random(seed))
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, max_length=12, batch_tokens=40, top_n=3,
              context=2, progress=False, backend="triton")
    sinks = []
    real = corpus_run.LatentStats

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sinks.append(self)

    monkeypatch.setattr(corpus_run, "LatentStats", Spy)
    fused = gradsae.score_corpus(model, sae, docs, **kw)
    assert len(sinks) > 2  # the run's tables and one sink per batch
    assert len(FUSED_CALLS) == len(sinks) - 1 and all(c == ("triton", True, False) for c in FUSED_CALLS)
    monkeypatch.setattr(corpus_run, "fused_backend", lambda *a: None)
    fused_calls = list(FUSED_CALLS)
    sinks.clear()
    plain = gradsae.score_corpus(model, sae, docs, **kw)
    assert len(sinks) == 1  # the run's tables only
    assert len(FUSED_CALLS) == len(fused_calls)
    assert_same_stats(fused.stats, plain.stats)
    for j in range(DSAE):
        assert fused.examples.rows(j) == plain.examples.rows(j)
    assert set(FIELDS) <= set(fused.stats.to_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_corpus_runner_on_a_gpu(monkeypatch, name, deterministic):
    """On a GPU the runner takes the fused path of the backend that serves, and ends with the
    plain path's statistics (counts and maxima exactly, sums to float64 rounding)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tm.model("gpt2", d=D, layers=2, seed=seed, scale=3.0).cuda()
    sae = random_sae(D, DSAE, "topk", k=K, seed=seed + 1, device="cuda")
    if fused_backend(sae, "cuda", name) != name:
        pytest.skip(f"backend {name!r} does not serve here")
    docs = _corpus(random.Random(seed), n=24)
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tm.tokenizer(), max_length=12, batch_tokens=40,
              top_n=3, context=2, progress=False, backend=name, deterministic=deterministic)
    fused = gradsae.score_corpus(model, sae, docs, **kw)
    monkeypatch.setattr(corpus_run, "fused_backend", lambda *a: None)
    plain = gradsae.score_corpus(model, sae, docs, **kw)
    assert_same_stats(fused.stats, plain.stats)
