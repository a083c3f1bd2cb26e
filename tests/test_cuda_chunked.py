"""The chunked strategy over the CUDA extension's streaming kernels, on the CPU, with a NumPy
stand-in for ``gradsae._C.stream_topk`` / ``stream_threshold``.

The stand-in honours the extension's contract (raw pointers, row strides, dtype codes, the
packed 64-bit key layout of the running top-k, counts past the capacity), so the adapter's
own logic runs here: pointers and strides of each chunk, the vector-load flag, key decoding,
chunk order. The kernels' logic itself is host-tested in test_cuda_stream.py; results here
are compared with the float64 oracle.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, max_errors, random_inputs, random_sae, selection_tol
from test_cuda_orchestration import FakeStream, _keys

from gradsae.backends import chunked
from gradsae.backends import cuda_stream
from gradsae.backends.reference import gather_dot
from gradsae.op import Influence


@pytest.fixture
def fake(monkeypatch):
    lib = FakeStream()
    monkeypatch.setattr(cuda_stream, "_lib", lambda: lib)
    monkeypatch.setattr(cuda_stream, "_launch", lambda device: types.SimpleNamespace(index=0, stream=0))
    monkeypatch.setattr(cuda_stream, "_device_ctx", lambda device: contextlib.nullcontext())
    return lib


def test_decode_keys_round_trip():
    v = np.array([3.5, 1e-30, 2.0, 2.0, -1.0, np.inf], dtype=np.float32)
    j = np.array([5, 70000, 9, 3, 2**31 - 2, 0])
    keys = torch.from_numpy(_keys(v, j).view(np.int64))
    vals, idx = cuda_stream.decode_keys(torch.cat([keys, torch.zeros(1, dtype=torch.int64)]))
    assert vals[:-1].tolist() == v.tolist() and idx[:-1].tolist() == j.tolist()
    assert vals[-1] == 0 and idx[-1] == -1


@pytest.mark.parametrize("activation,rescale,dtype", [("topk", False, torch.float32), ("topk", True, torch.bfloat16),
                                                      ("jumprelu", True, torch.float32), ("relu", False, torch.bfloat16)])
def test_chunked_over_cuda_stream_matches_oracle(fake, activation, rescale, dtype):
    d_in, d_sae, n = 16, 600, 21
    sae = random_sae(d_in, d_sae, activation, k=9, rescale=rescale, dtype=dtype)
    x, g = random_inputs((n,), d_in, "cpu", dtype)
    a, _ = sae.preprocess(x)
    dec_norm = sae.decoder_norm().float() if rescale else None
    budget = n * 256 * torch.finfo(dtype).bits // 8  # 256 columns a chunk: 3 chunks
    if activation == "topk":
        acts, idx = chunked.topk(a, sae.W_enc, sae.b_enc.float(), 9, dec_norm, cuda_stream, budget=budget)
    else:
        acts, idx, counts = chunked.threshold(a, sae.W_enc, sae.b_enc.float(), sae.selection_threshold().float(),
                                              d_sae, dec_norm, cuda_stream, budget=budget)
        K = max(1, int(counts.max()))
        acts, idx = acts[:, :K], idx[:, :K]
    grads = gather_dot(sae.W_dec, idx, g, None, sae.col_scale()).float()
    out = Influence(idx, acts, grads, acts * grads, d_sae)
    orc = dense_oracle(sae, x, g)
    if dtype == torch.float32:
        assert_matches_oracle(out, orc, sae, atol=1e-4, rtol=1e-4)
    else:  # error at most 2x the reference's in the same dtype (DESIGN: low precision)
        import gradsae

        e_c, e_r = max_errors(out, orc), max_errors(gradsae.influence(x, g, sae, backend="reference"), orc)
        for f in ("acts", "grads", "scores"):
            assert e_c[f] <= 2 * e_r[f] + 1e-3, (f, e_c, e_r)
        assert_matches_oracle(out, orc, sae, atol=0.1, rtol=0.05, set_tol=max(0.1, selection_tol(sae, x, orc)))
    calls = fake.calls
    assert [c[2] for c in calls] == [0, 256, 512] and [c[3] for c in calls] == [256, 256, 88]
    assert all(c[1] == {torch.float32: 0, torch.bfloat16: 2}[dtype] for c in calls)
    assert all(c[4] == c[3] for c in calls)  # each chunk written densely by the GEMM
    # 16-byte loads where rows stay aligned: 88 bf16 columns are 176 bytes, 88 fp32 352
    assert [c[5] for c in calls[:2]] == [True, True] and calls[2][5] is True


def test_strided_chunk_and_threshold_overflow(fake):
    n, d = 6, 300
    P = torch.randn(n, d + 5)[:, :d]  # row stride 305: no vector loads
    thr = torch.zeros(d)
    sel = cuda_stream.StreamThreshold(n, 10, thr, "cpu")
    sel.fold(P[:, :100], 0)
    sel.fold(P[:, 100:], 100)
    acts, idx, counts = sel.result()
    assert torch.equal(counts, (P > 0).sum(-1))
    assert all(c[4] == 305 and c[5] is False for c in fake.calls)
    for r in range(n):
        want = (P[r] > 0).nonzero().flatten()[:10]
        assert torch.equal(idx[r, : want.numel()], want)
    with pytest.raises(ValueError, match="ascending"):
        sel.fold(P[:, :10], 0)
