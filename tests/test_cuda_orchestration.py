"""The Python side of the ``cuda`` backend on the CPU, with a stand-in for ``gradsae._C``.

The stand-in honours the module's contract (raw pointers, strides, dtype codes; per-split
partial results handed from ``encode_select`` to the merge kernels; the streaming folds'
packed keys and counts) with NumPy on host memory, so the backend's own logic runs here,
driven by the op as on a GPU, for both encode strategies (``chunked``, the default: chunks of
latents through torch.mm and the folds; ``fused``: the split plan and the merges): the
per-row counts behind the op's capacity retry and CapacityError, row and column scales, the
gather-dot arguments (strides, vector-load flag), the fused and deterministic statistics
paths (table pointers in STATS_FIELDS order), masks and token counts. Results are compared
with the float64 oracle and the reference backend. The real kernels are compared with the
oracle by the gpu tests in test_cuda_backend.py and test_chunked_gpu.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import types

import numpy as np
import pytest
import torch
from oracle import assert_matches_oracle, dense_oracle, random_sae, selection_tol

import gradsae
from gradsae.backends import cuda_backend, cuda_stream, get_backend
from gradsae.errors import CapacityError
from gradsae.op import MAX_K, Request, capacity
from gradsae.stats import FIELDS, LatentStats

_NP = {0: np.float32, 1: np.float16}


def _view(ptr: int, dtype, shape, strides=None):
    """NumPy view of host memory at ``ptr`` (strides in elements)."""
    item = np.dtype(dtype).itemsize
    strides = strides or tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides)) if all(shape) else 0
    buf = (ctypes.c_char * (span * item)).from_address(ptr)
    flat = np.frombuffer(buf, dtype=dtype, count=span)
    return np.lib.stride_tricks.as_strided(flat, shape, tuple(st * item for st in strides))


def _floats(ptr, code, shape, strides=None):
    if code == 2:  # bfloat16: the high half of a float32
        u = _view(ptr, np.uint16, shape, strides).astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    return _view(ptr, _NP[code], shape, strides).astype(np.float64)


def _keys(v: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The extension's keys: order-preserving float bits high, ~index low."""
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    o = np.where(u & 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)
    return ((o << np.uint64(32)) | ((~j.astype(np.uint64)) & 0xFFFFFFFF)).astype(np.uint64)


class FakeStream:
    """The streaming folds of gradsae._C (``stream_topk``, ``stream_threshold``) in NumPy."""

    MAX_K = 256
    topk_pad = staticmethod(lambda k: max(32, 1 << (k - 1).bit_length()))
    stream_topk_smem_bytes = staticmethod(lambda kp: 8 * (kp + 256) * 8)

    def __init__(self):
        self.calls = []

    def _values(self, p, p_stride, dtype, n, ncols, c0, bias, scale):
        v = _floats(p, dtype, (n, ncols), (p_stride, 1)).astype(np.float32)
        if bias:
            v = v + _view(bias, np.float32, (c0 + ncols,))[c0:]
        if scale:
            v = v * _view(scale, np.float32, (c0 + ncols,))[c0:]
        return v.astype(np.float32)

    def stream_topk(self, *, device, stream, p, p_stride, dtype, n, ncols, c0, bias, scale, k, kp, best, vec):
        self.calls.append(("topk", dtype, c0, ncols, p_stride, vec))
        v = self._values(p, p_stride, dtype, n, ncols, c0, bias, scale)
        B = _view(best, np.uint64, (n, kp))
        for r in range(n):
            old = [int(x) for x in B[r] if x != 0]
            new = [int(x) for x in _keys(v[r], np.arange(c0, c0 + ncols))[v[r] > 0]]
            top = sorted(old + new, reverse=True)[:kp]
            B[r] = np.array(top + [0] * (kp - len(top)), dtype=np.uint64)

    def stream_threshold(self, *, device, stream, p, p_stride, dtype, n, ncols, c0, bias, scale, thr, cap, idx, val,
                         counts, vec):
        self.calls.append(("threshold", dtype, c0, ncols, p_stride, vec, cap))
        v = self._values(p, p_stride, dtype, n, ncols, c0, bias, scale)
        t = _view(thr, np.float32, (c0 + ncols,))[c0:]
        I, V, C = _view(idx, np.int64, (n, cap)), _view(val, np.float32, (n, cap)), _view(counts, np.int32, (n,))
        for r in range(n):
            for j in np.flatnonzero(v[r] > t):
                if C[r] < cap:
                    I[r, C[r]], V[r, C[r]] = c0 + j, v[r, j]
                C[r] += 1


class FakeC(FakeStream):
    """The gradsae._C contract in NumPy; partial results are kept per ``parts`` pointer."""

    MAX_K = 256
    TILE_COLS = 128
    STATS_FIELDS = ("count", "act_sum", "score_sum", "relu_sum", "abs_sum", "score_max")

    def __init__(self):
        super().__init__()
        self.parts = {}
    encode_smem_bytes = staticmethod(lambda dtype, mode, kp, tile_rows: 1024 * tile_rows)
    compiled_archs = staticmethod(lambda: "sm_80, sm_90, compute_90")
    cuda_runtime_version = staticmethod(lambda: 13000)

    def encode_select(self, *, device, stream, x, x_stride, w, w_stride, bias, scale, thr, dtype, n, d_in, d_sae,
                      mode, k, kp, cap, split_cols, n_splits, tile_rows, parts, counts, vec):
        self.calls.append(("encode", n, mode, cap, split_cols, n_splits, tile_rows))
        self.split_cols = split_cols
        assert split_cols % 128 == 0 and (n_splits - 1) * split_cols < d_sae <= n_splits * split_cols
        X = _floats(x, dtype, (n, d_in), (x_stride, 1))
        W = _floats(w, dtype, (d_in, d_sae), (w_stride, 1))
        v = X @ W + _floats(bias, dtype, (d_sae,))
        if scale:
            v = v * _view(scale, np.float32, (d_sae,))
        t = _view(thr, np.float32, (d_sae,)) if thr else np.zeros(d_sae)
        out = []
        for r in range(n):
            row = []
            for s in range(n_splits):
                cols = [j for j in range(s * split_cols, min(d_sae, (s + 1) * split_cols)) if v[r, j] > t[j]]
                if mode == 0:
                    cols = sorted(cols, key=lambda j: (-v[r, j], j))[:kp]
                row.append([(j, v[r, j]) for j in cols])  # threshold: all, counted past cap
            out.append(row)
        self.parts[parts] = out

    def merge_topk(self, *, device, stream, parts, n, n_splits, k, kp, idx, acts):
        I, A = _view(idx, np.int64, (n, k)), _view(acts, np.float32, (n, k))
        for r, row in enumerate(self.parts.pop(parts)):
            best = sorted([c for split in row for c in split], key=lambda c: (-c[1], c[0]))[:k]
            I[r] = -1
            A[r] = 0
            for s, (j, val) in enumerate(best):
                I[r, s], A[r, s] = j, val

    def merge_threshold(self, *, device, stream, parts, counts, n, n_splits, cap, cap_out, idx, acts, row_counts):
        assert cap <= self.split_cols, "a split's slots never exceed its columns"
        I, A = _view(idx, np.int64, (n, cap_out)), _view(acts, np.float32, (n, cap_out))
        C = _view(row_counts, np.int32, (n,))
        for r, row in enumerate(self.parts.pop(parts)):
            flat = [c for split in row for c in split]  # ascending latent order
            I[r] = -1
            A[r] = 0
            for s, (j, val) in enumerate(flat[:cap_out]):
                I[r, s], A[r, s] = j, val
            C[r] = sum(len(sp) for sp in row)

    def gather_dot(self, *, device, stream, w, w_stride, w_dtype, d, d_stride, d_dtype, idx, n, K, d_in,
                   row_scale=0, col_scale=0, out=0, vec=False, acts=0, mask=0, stats=()):
        assert len(stats) in (0, len(self.STATS_FIELDS))
        self.calls.append(("gather", vec, bool(stats)))
        I = _view(idx, np.int64, (n, K))
        d_sae = int(I.max()) + 1 if I.size else 0
        W = _floats(w, w_dtype, (max(d_sae, 1), d_in), (w_stride, 1))
        D = _floats(d, d_dtype, (n, d_in), (d_stride, 1))
        g = np.einsum("nkd,nd->nk", W[np.clip(I, 0, None)], D).astype(np.float32)
        if row_scale:
            g *= _view(row_scale, np.float32, (n,))[:, None]
        if col_scale:
            g *= _view(col_scale, np.float32, (max(d_sae, 1),))[np.clip(I, 0, None)]
        g[I < 0] = 0
        if out:
            _view(out, np.float32, (n, K))[:] = g
        if stats:
            a = _view(acts, np.float32, (n, K))
            m = _view(mask, np.bool_, (n,)) if mask else np.ones(n, bool)
            valid = (I >= 0) & m[:, None]
            self._add(I[valid], a[valid], (a * g)[valid], stats)

    def segment_stats(self, *, device, stream, j, acts, scores, m, stats):
        J = _view(j, np.int64, (m,))
        assert (np.diff(J) >= 0).all(), "entries must arrive sorted by latent"
        self._add(J, _view(acts, np.float32, (m,)), _view(scores, np.float32, (m,)), stats)

    def _add(self, j, a, s, stats):
        assert len(stats) == len(self.STATS_FIELDS)
        t = dict(zip(self.STATS_FIELDS, stats))  # the pointers by name, in the module's order
        count, act_sum, score_sum, relu_sum, abs_sum, score_max = (
            t[f] for f in ("count", "act_sum", "score_sum", "relu_sum", "abs_sum", "score_max"))
        d = int(j.max()) + 1 if j.size else 0
        a, s = a.astype(np.float64), s.astype(np.float32).astype(np.float64)
        for ptr, vals in ((act_sum, a), (score_sum, s), (relu_sum, np.maximum(s, 0)), (abs_sum, np.abs(s))):
            np.add.at(_view(ptr, np.float64, (d,)), j, vals)
        np.add.at(_view(count, np.int64, (d,)), j, 1)
        np.maximum.at(_view(score_max, np.float64, (d,)), j, s)


@pytest.fixture
def fake(monkeypatch):
    lib = FakeC()
    monkeypatch.setattr(cuda_backend, "_lib", lib)
    monkeypatch.setattr(cuda_backend, "_on_gpu", lambda t: True)
    monkeypatch.setattr(cuda_backend, "_Launch", lambda device: types.SimpleNamespace(index=0, stream=0))
    monkeypatch.setattr(cuda_stream, "_launch", lambda device: types.SimpleNamespace(index=0, stream=0))
    monkeypatch.setattr(cuda_stream, "_device_ctx", lambda device: contextlib.nullcontext())
    monkeypatch.delenv("GRADSAE_STRATEGY", raising=False)
    # the tensors stay on the CPU: let the op's dispatch hand them to the backend
    monkeypatch.setattr(cuda_backend.CudaBackend, "unsupported", lambda self, req: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=2,
                                                             shared_memory_per_block_optin=50000))
    return lib


CASES = [
    ("topk", True, "layer_norm", 7, torch.float32),
    ("topk", False, "constant_norm_rescale", 40, torch.float32),
    ("jumprelu", True, "none", None, torch.float32),
    ("relu", False, "layer_norm", None, torch.float32),
    # bfloat16 weights and inputs (dtype code 2); no normalisation, whose bf16 statistics
    # alone would dominate the error
    ("topk", True, "none", 16, torch.bfloat16),
    ("jumprelu", False, "none", None, torch.bfloat16),
]


def _encode_calls(lib, strategy):
    return [c for c in lib.calls if c[0] in (("encode",) if strategy == "fused" else ("topk", "threshold"))]


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
@pytest.mark.parametrize("activation,rescale,normalize,k,dtype", CASES)
def test_influence_orchestration_matches_oracle(fake, monkeypatch, strategy, activation, rescale, normalize, k,
                                                dtype):
    d_in, d_sae, n = 24, 700, 37
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    monkeypatch.setenv("GRADSAE_CHUNK_BYTES", str(n * 256 * 4))  # chunks of 256 (fp32) or 512 (bf16) latents
    sae = random_sae(d_in, d_sae, activation, k=k or 8, normalize=normalize, rescale=rescale, dtype=dtype)
    x = (torch.randn(n, d_in) * 2).to(dtype)
    g = torch.randn(n, d_in).to(dtype)
    out = gradsae.influence(x, g, sae, backend="cuda")
    orc = dense_oracle(sae, x, g)
    if activation != "topk" and dtype == torch.float32:  # bf16 moves values across the threshold
        assert out.K == max(1, int((orc["z"] != 0).sum(-1).max()))
    tol = 1e-4 if dtype == torch.float32 else 0.05
    set_tol = tol if dtype == torch.float32 else selection_tol(sae, x, orc)
    assert_matches_oracle(out, orc, sae, atol=tol, rtol=tol, set_tol=set_tol)
    enc = _encode_calls(fake, strategy)
    other = _encode_calls(fake, "fused" if strategy == "chunked" else "chunked")
    assert enc and not other, "the strategy asked for runs, and only it"
    if strategy == "fused":
        assert all(c[5] > 1 for c in enc)  # several d_sae splits planned for this GPU size
        assert all(c[6] == 32 for c in enc)  # 64-row tiles need more shared memory than this GPU has
    else:
        cols = 256 if dtype == torch.float32 else 512
        c0s = [c[2] for c in enc]
        passes = c0s.count(0)  # a threshold SAE may take a second pass at the exact size
        assert c0s == list(range(0, d_sae, cols)) * passes and passes >= 1
        assert all(c[1] == {torch.float32: 0, torch.bfloat16: 2}[dtype] for c in enc)


def test_chunked_is_the_default_and_fused_needs_its_tile(fake, monkeypatch):
    """Without an override, small inputs (nothing measured) run the default, chunked; fused
    is offered only where its encode tile fits the GPU's shared memory."""
    sae = random_sae(16, 300, "topk", k=5)
    x = torch.randn(9, 16)
    gradsae.influence(x, x, sae, backend="cuda")
    assert _encode_calls(fake, "chunked") and not _encode_calls(fake, "fused")
    b = get_backend("cuda")
    req = Request(x, x, sae, 5)
    assert b.strategies(req) == ("chunked", "fused")
    small = types.SimpleNamespace(multi_processor_count=2, shared_memory_per_block_optin=32 * 1024 - 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: small)
    assert b.strategies(req) == ("chunked",)  # a 32-row tile needs 32 KB in this stand-in


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_capacity_retry_and_error(fake, monkeypatch, strategy):
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    monkeypatch.setattr(capacity, "INITIAL_CAPACITY", 3)
    monkeypatch.setattr(cuda_backend, "PARTS_BUDGET", 8 * 3 * 4 * 8)  # a few rows per chunk
    monkeypatch.setenv("GRADSAE_CHUNK_BYTES", str(30 * 256 * 4))  # chunked: 256 latents a chunk
    sae = random_sae(16, 300, "relu", dtype=torch.float32)
    x = torch.randn(30, 16)
    g = torch.randn(30, 16)
    out = gradsae.influence(x, g, sae, backend="cuda")
    ref = gradsae.influence(x, g, sae, backend="reference")
    need = int((ref.indices >= 0).sum(-1).max())
    assert out.K == ref.K == need > 3
    a, b = out.canonical(), ref.canonical()
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    caps = [c[3] for c in fake.calls if c[0] == "encode"] if strategy == "fused" else \
        [c[6] for c in fake.calls if c[0] == "threshold"]
    assert caps[0] == 3 and any(c > 3 for c in caps), "an overflowing first pass is re-run larger"
    with pytest.raises(CapacityError) as ours:
        gradsae.influence(x, g, sae, k=need - 1, backend="cuda")
    with pytest.raises(CapacityError) as theirs:
        gradsae.influence(x, g, sae, k=need - 1, backend="reference")
    assert str(ours.value) == str(theirs.value)
    roomy = gradsae.influence(x, g, sae, k=need + 2, backend="cuda").indices
    assert roomy.shape[1] == need + 2 and bool((roomy[:, need:] == -1).all())


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_accumulate_paths(fake, monkeypatch, deterministic, strategy):
    monkeypatch.setenv("GRADSAE_STRATEGY", strategy)
    d_sae = 500
    sae = random_sae(20, d_sae, "topk", k=9, normalize="layer_norm", rescale=True)
    x, g = torch.randn(45, 20) * 2, torch.randn(45, 20)
    mask = torch.rand(45) > 0.4
    want = LatentStats(d_sae)
    want.update(gradsae.influence(x, g, sae, backend="reference"), mask)
    got = LatentStats(d_sae)
    gradsae.accumulate_influence(x, g, sae, got, mask, backend="cuda", deterministic=deterministic)
    assert got.tokens == want.tokens == int(mask.sum())
    assert torch.equal(got.count, want.count)
    atol = 1e-5 * float(want.abs_sum.max())  # float32 scores; sums of mixed signs cancel
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum", "score_max"):
        torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=1e-5, atol=atol, msg=f)
    fused = [c for c in fake.calls if c[0] == "gather"]
    assert fused[-1][2] is (not deterministic)  # atomics only when non-deterministic
    assert _encode_calls(fake, strategy)


def test_gather_dot_strides_and_vector_flag(fake):
    sae = random_sae(24, 80, "topk", k=5)
    idx = torch.randint(-1, 80, (6, 5))
    D = torch.randn(6, 40)[:, 3:27]  # row stride 40, offset 3 floats: no 16-byte vectors
    got = get_backend("cuda").gather_dot(sae.W_dec, idx, D, None, None)
    from gradsae.backends.reference import gather_dot

    torch.testing.assert_close(got, gather_dot(sae.W_dec, idx, D), rtol=1e-5, atol=1e-5)
    assert fake.calls[-1] == ("gather", False, False)
    get_backend("cuda").gather_dot(sae.W_dec, idx, torch.randn(6, 24).contiguous(), None, None)
    assert fake.calls[-1][1] == (sae.W_dec.data_ptr() % 16 == 0)


def test_a_module_built_from_other_sources_is_refused(monkeypatch):
    """The compiled module must keep the top-k limit and the statistics tables, in order, that
    the Python side passes it; otherwise the backend says so instead of corrupting memory."""
    assert FakeC.STATS_FIELDS == FIELDS and FakeC.MAX_K == MAX_K
    assert cuda_backend._mismatch(FakeC()) is None
    swapped = FakeC()
    swapped.STATS_FIELDS = FIELDS[:1] + (FIELDS[2], FIELDS[1]) + FIELDS[3:]
    assert "act_sum" in cuda_backend._mismatch(swapped)
    narrow = FakeC()
    narrow.MAX_K = 128
    assert "128" in cuda_backend._mismatch(narrow)
