"""The ``chunked`` encode strategy: the vendor GEMM per chunk of latents, then one streaming
selection pass per chunk.

    for each chunk of latents c0 .. c1 (and, for very many tokens, each block of rows):
        P = a @ W_enc[:, c0:c1]                  torch.mm: cuBLAS on a GPU, [rows, c1 - c0]
        fold P into the running selection        (P + bias) * scale, one read of P

The chunk buffer is the only large temporary: its size comes from a memory budget
(``GRADSAE_CHUNK_BYTES``, default 256 MiB), never ``[T, d_sae]``; the running selection adds
O(T x k). The bias (fp32, with ``b_dec`` folded in by the caller) and the decoder-norm scale
are applied by the selection kernel in fp32, so the GEMM runs bare (its fastest form) and
the bias is never rounded to the inputs' precision.

The GEMM's output type (``out_dtype``, ``GRADSAE_CHUNK_DTYPE``): by default the inputs' own
type (bf16 in, bf16 out: half the bytes written and read back, rounding like the PyTorch
reference in that dtype); ``float32`` keeps the fp32 accumulator (bf16 in, fp32 out through
``torch.mm(..., out_dtype=)`` where torch has it), so the selection sees the values the fused
kernels see.

The selection kernels are the backend's: an object with ``StreamTopK`` and
``StreamThreshold`` classes (``gradsae.kernels.stream_select`` for Triton, the CUDA
extension's adapter for ``cuda``), each with ``fold(chunk, c0)`` and ``result()``.
:func:`select` answers a :class:`~gradsae.op.Request` with a :class:`~gradsae.op.Selection`
(what the ``triton`` and ``cuda`` backends run for ``strategy="chunked"``).
"""

from __future__ import annotations

import os

import torch

from ..op.contract import Request, Selection

DEFAULT_BUDGET = 256 << 20
# Columns per chunk are a multiple of this (keeps rows 16-byte aligned for vector loads).
COL_GRANULE = 256
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def budget_bytes(budget: int | None = None) -> int:
    """The chunk buffer's size in bytes: ``budget``, else ``GRADSAE_CHUNK_BYTES``, else 256 MiB."""
    if budget is not None:
        return int(budget)
    env = os.environ.get("GRADSAE_CHUNK_BYTES", "").strip()
    return int(float(env)) if env else DEFAULT_BUDGET


def chunk_dtype(in_dtype: torch.dtype, out_dtype=None) -> torch.dtype:
    """The GEMM's output type: ``out_dtype`` (a dtype or its name), else
    ``GRADSAE_CHUNK_DTYPE``, else the inputs' own type."""
    choice = out_dtype if out_dtype is not None else os.environ.get("GRADSAE_CHUNK_DTYPE", "").strip() or None
    if choice is None or choice == "auto":
        return in_dtype
    if isinstance(choice, torch.dtype):
        return choice
    if choice not in _DTYPES:
        raise ValueError(f"chunk output dtype {choice!r}: expected one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[choice]


def plan(n: int, d_sae: int, elem_bytes: int, budget: int) -> tuple[int, int]:
    """(rows per block, columns per chunk) with ``rows * cols * elem_bytes <= budget`` where
    possible. All rows go in one block while that leaves at least COL_GRANULE columns a chunk
    (every block of rows reads all of W_enc once, so row blocks are the last resort); then
    blocks of rows with 4 * COL_GRANULE columns. Columns are a multiple of COL_GRANULE unless
    the chunk is all of d_sae."""
    n = max(n, 1)
    cols = budget // (n * elem_bytes)
    if cols >= d_sae:
        return n, d_sae
    if cols >= COL_GRANULE:
        return n, cols // COL_GRANULE * COL_GRANULE
    cols = min(d_sae, 4 * COL_GRANULE)
    rows = max(1, budget // (cols * elem_bytes))
    return min(rows, n), cols


_MM_OUT_DTYPE: bool | None = None


def _mm_out_dtype_works(a: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, w, out_dtype=dtype, out=...)`` works here (newer torch, CUDA)."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:
            o = torch.empty((1, 1), dtype=dtype, device=a.device)
            torch.mm(a[:1], w[:, :1], out_dtype=dtype, out=o)
            _MM_OUT_DTYPE = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE


def gemm_into(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ w`` (``out`` contiguous, of the chunk's output type)."""
    if out.dtype == a.dtype:
        return torch.mm(a, w, out=out)
    if a.is_cuda and out.dtype == torch.float32 and _mm_out_dtype_works(a, w, out.dtype):
        return torch.mm(a, w, out_dtype=out.dtype, out=out)
    # fp32 products of 16-bit inputs are exact, so this equals a 16-bit GEMM with an fp32
    # accumulator up to the order of the sums (the CPU path, and torch without out_dtype)
    return torch.mm(a.to(out.dtype), w.to(out.dtype), out=out)


def _row_blocks(n: int, rows: int):
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _chunks(a, W_enc, cols, dtype):
    """Yield ``(c0, P)`` for every chunk of latents, P the GEMM's output ``[rows, c1 - c0]``
    in one reused buffer."""
    d_sae = W_enc.shape[1]
    buf = torch.empty(a.shape[0] * cols, dtype=dtype, device=a.device)
    for c0 in range(0, d_sae, cols):
        c1 = min(d_sae, c0 + cols)
        out = buf[: a.shape[0] * (c1 - c0)].view(a.shape[0], c1 - c0)
        yield c0, gemm_into(a, W_enc[:, c0:c1], out)


def topk(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor | None, k: int,
         dec_norm: torch.Tensor | None, kernels, *, budget: int | None = None,
         out_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` latents of ``v = (a @ W_enc + bias) * dec_norm`` per row, chunk by chunk.

    Returns ``(acts float32, indices int64)``, ``[N, min(k, d_sae)]``, descending; slots
    whose value is not positive are empty (-1, 0). ``kernels``: see the module docstring.
    """
    n, d_sae = a.shape[0], W_enc.shape[1]
    K = min(k, d_sae)
    dtype = chunk_dtype(a.dtype, out_dtype)
    rows, cols = plan(n, d_sae, torch.finfo(dtype).bits // 8, budget_bytes(budget))
    acts, idx = [], []
    for r0, r1 in _row_blocks(n, rows):
        sel = kernels.StreamTopK(r1 - r0, K, a.device, bias, dec_norm)
        for c0, P in _chunks(a[r0:r1], W_enc, cols, dtype):
            sel.fold(P, c0)
        ac, ix = sel.result()
        acts.append(ac)
        idx.append(ix)
    if len(acts) == 1:
        return acts[0], idx[0]
    return torch.cat(acts), torch.cat(idx)


def threshold(a: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor | None, thr: torch.Tensor, cap: int,
              dec_norm: torch.Tensor | None, kernels, *, budget: int | None = None,
              out_dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents with ``v > thr[j]`` per row, in ascending latent order, in ``cap`` slots.

    Returns ``(acts float32 [N, cap], indices int64 [N, cap], counts int64 [N])``; counts are
    exact, so ``counts > cap`` marks a row that overflowed (its slots hold its first ``cap``
    active latents) and the caller decides: raise, or run again with a larger ``cap``.
    """
    n, d_sae = a.shape[0], W_enc.shape[1]
    dtype = chunk_dtype(a.dtype, out_dtype)
    rows, cols = plan(n, d_sae, torch.finfo(dtype).bits // 8, budget_bytes(budget))
    parts = []
    for r0, r1 in _row_blocks(n, rows):
        sel = kernels.StreamThreshold(r1 - r0, cap, thr, a.device, bias, dec_norm)
        for c0, P in _chunks(a[r0:r1], W_enc, cols, dtype):
            sel.fold(P, c0)
        parts.append(sel.result())
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(p) for p in zip(*parts))


def encoder_input(sae, x: torch.Tensor):
    """``(a, bias, row_scale)``: the encoder's input, its fp32 bias and the decode's per-row
    slope (None without normalisation). Without normalisation ``b_dec`` is folded into the
    bias in fp32, ``(x - b_dec) @ W = x @ W - b_dec @ W``, so ``x`` goes to the GEMM as it is
    (no ``[N, d_in]`` temporary); the folded bias is cached on the SAE."""
    if sae.normalize_activations == "none":
        a = x.to(sae.dtype)
        if sae.apply_b_dec_to_input:
            bias = sae.cached("kernel_bias", lambda: sae.b_enc.float() - sae.b_dec.float() @ sae.W_enc.float())
        else:
            bias = sae.cached("kernel_benc", lambda: sae.b_enc.float())
        return a, bias, None
    a, state = sae.preprocess(x)
    return a, sae.cached("kernel_benc", lambda: sae.b_enc.float()), state.row_scale


def select(req: Request, folds, *, budget: int | None = None, out_dtype=None) -> Selection:
    """The chunked strategy's answer to ``req`` (``req.k`` slots; threshold SAEs with exact
    counts), with ``folds`` the backend's streaming kernels (see the module docstring)."""
    sae = req.sae
    a, bias, row_scale = encoder_input(sae, req.x)
    dec_norm = sae.decoder_norm().float() if sae.rescale_acts_by_decoder_norm else None
    if sae.activation == "topk":
        acts, idx = topk(a, sae.W_enc, bias, req.k, dec_norm, folds, budget=budget, out_dtype=out_dtype)
        return Selection(idx, acts, None, row_scale)
    thr = sae.cached("kernel_thr", lambda: sae.selection_threshold().float())
    acts, idx, counts = threshold(a, sae.W_enc, bias, thr, req.k, dec_norm, folds, budget=budget,
                                  out_dtype=out_dtype)
    return Selection(idx, acts, counts, row_scale)
