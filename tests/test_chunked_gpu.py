"""The chunked strategy on a CUDA GPU: cuBLAS per chunk of latents and the streaming folds,
Triton's and the CUDA extension's, at realistic shapes against the float64 oracle, with
chunks that end mid-tile, bf16 chunks and fp32 chunks, threshold capacities with exact
counts, and NaN. Skipped without a GPU (their logic is tested on the CPU in
test_triton_stream.py, test_cuda_stream.py and test_cuda_chunked.py)."""

import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, random_sae, selection_tol
from test_triton_stream import chunked_influence

import gradsae

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _kernels(name):
    if name == "triton":
        from gradsae.kernels import stream_select

        return stream_select
    from gradsae.backends import Request, cuda_stream, get_backend

    why = get_backend("cuda").unsupported(Request(torch.zeros(1, 8, device=DEV), None, random_sae(8, 64, device=DEV), 4))
    if why is not None:
        pytest.skip(f"cuda backend: {why}")
    return cuda_stream


def _inputs(n, d_in, dtype, scale=2.0):
    x = (torch.randn(n, d_in, dtype=torch.float64) * scale).to(DEV, dtype)
    g = torch.randn(n, d_in, dtype=torch.float64).to(DEV, dtype)
    return x, g


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
@pytest.mark.parametrize("activation,k,rescale", [("topk", 64, False), ("topk", 37, True), ("jumprelu", None, False)])
def test_chunked_fp32_matches_oracle(kernels, activation, k, rescale):
    torch.backends.cuda.matmul.allow_tf32 = False
    sae = random_sae(768, 20000, activation, k=k or 8, rescale=rescale, device=DEV)
    x, g = _inputs(301, 768, torch.float32)
    # 301 rows x 4096 fp32 columns a chunk: 5 chunks, the last one 3616 wide
    out = chunked_influence(sae, x, g, budget=301 * 4096 * 4, kernels=_kernels(kernels))
    assert_matches_oracle(out, dense_oracle(sae, x, g), sae, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
@pytest.mark.parametrize("out_dtype", [None, "float32"])
@pytest.mark.parametrize("activation,rescale", [("topk", False), ("topk", True), ("relu", False)])
def test_chunked_bf16_within_twice_reference(kernels, out_dtype, activation, rescale):
    sae = random_sae(2304, 16384, activation, k=64, rescale=rescale, dtype=torch.bfloat16, device=DEV)
    if activation == "relu":
        sae.b_enc -= 1.0
        sae._cache.clear()
    x, g = _inputs(200, 2304, torch.bfloat16)
    orc = dense_oracle(sae, x, g)
    out = chunked_influence(sae, x, g, budget=200 * 3000 * 2, out_dtype=out_dtype, kernels=_kernels(kernels))
    ref = gradsae.influence(x, g, sae, backend="reference")
    e_c, e_r = max_errors(out, orc), max_errors(ref, orc)
    for f in ("acts", "grads", "scores"):
        assert e_c[f] <= 2 * e_r[f] + 1e-3, (f, e_c, e_r)
    assert_matches_oracle(out, orc, sae, atol=0.1, rtol=0.05, set_tol=max(0.1, selection_tol(sae, x, orc)))


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_threshold_counts_past_capacity(kernels):
    from gradsae.backends import chunked

    sae = random_sae(512, 8192, "relu", device=DEV)
    x, _ = _inputs(257, 512, torch.float32)
    a, _ = sae.preprocess(x)
    thr = sae.selection_threshold().float()
    acts, idx, counts = chunked.threshold(a, sae.W_enc, sae.b_enc.float(), thr, 16, None, _kernels(kernels),
                                          budget=257 * 1024 * 4)
    v = dense_oracle(sae, x, x)["v"]
    clear = ~((v.abs() < 1e-3).any(-1))  # rows with a value within rounding of the threshold aside
    assert bool(clear.sum() > 200)
    assert torch.equal(counts.cpu()[clear], (v > 0).sum(-1)[clear])
    assert bool((counts.cpu() > 16).any())
    for r in clear.nonzero().flatten().tolist():
        want = (v[r] > 0).nonzero().flatten()[:16]
        assert torch.equal(idx[r, : want.numel()].cpu(), want)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_op_times_both_strategies_once_and_caches_the_faster(backend, monkeypatch, tmp_path):
    """A large enough call measures every strategy the backend offers on this GPU, writes the
    decision for its bucket, runs it (results within the bf16 rule), and the next call of the
    bucket only reads it."""
    import json

    from gradsae.backends import Request, get_backend
    from gradsae.op import strategy

    if backend == "cuda":
        _kernels("cuda")  # skips where the extension is not built
    cache = tmp_path / "strategy.json"
    monkeypatch.setenv("GRADSAE_STRATEGY_CACHE", str(cache))
    monkeypatch.delenv("GRADSAE_STRATEGY", raising=False)
    strategy.forget()
    sae = random_sae(2304, 32768, "topk", k=64, dtype=torch.bfloat16, device=DEV)
    x, g = _inputs(1024, 2304, torch.bfloat16)
    assert 600 * sae.d_sae >= strategy.MEASURE_MIN  # both calls below are measured or cached
    out = gradsae.influence(x, g, sae, backend=backend)
    req = Request(x, g, sae, 64)
    entry = json.loads(cache.read_text())["decisions"][strategy.bucket(backend, req, 64)]
    offered = get_backend(backend).strategies(req)
    assert set(entry["seconds"]) == set(offered) and all(t > 0 for t in entry["seconds"].values())
    assert entry["strategy"] == min(entry["seconds"], key=entry["seconds"].get)
    rows = torch.arange(0, 1024, 7)
    orc = dense_oracle(sae, x[rows], g[rows])
    sub = gradsae.Influence(out.indices[rows], out.acts[rows], out.grads[rows], out.scores[rows], sae.d_sae)
    ref = gradsae.influence(x[rows], g[rows], sae, backend="reference")
    e_o, e_r = max_errors(sub, orc), max_errors(ref, orc)
    for f in ("acts", "grads", "scores"):
        assert e_o[f] <= 2 * e_r[f] + 1e-3, (f, e_o, e_r)
    monkeypatch.setattr(strategy, "measure", lambda *a: pytest.fail("the bucket was measured twice"))
    gradsae.influence(x[:600], g[:600], sae, backend=backend)  # 600 rows: the same bucket (1024)
