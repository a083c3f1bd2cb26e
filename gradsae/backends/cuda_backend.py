"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/`` (the pybind11 module ``gradsae._C``).

The module takes raw device pointers, strides, dtype codes and the current CUDA stream, so it
builds with nvcc alone and never links libtorch. Per call:

1. The encode and the selection, by one of two strategies (the op picks one per call,
   :mod:`gradsae.op.strategy`):

   - ``chunked`` (the default; docs/gpu.md says why): the vendor GEMM (``torch.mm``, cuBLAS)
     writes the pre-activations of one chunk of latents at a time into a buffer sized by a
     memory budget, and the streaming kernels (``stream_topk`` / ``stream_threshold``, a warp
     per row) fold each chunk into the running top-k or threshold compaction, applying the
     fp32 bias and decoder-norm scale (:mod:`.chunked`, :mod:`.cuda_stream`);
   - ``fused``: ``sae.preprocess`` (normalisation, ``- b_dec``) in PyTorch, then the fused
     encode kernel: a tensor-core GEMM tile (bf16/fp16, fp32 accumulate; SIMT fp32 for fp32
     weights) whose epilogue keeps each row's running top-k, or compacts the latents above
     threshold, per split of d_sae; a merge kernel combines the splits.

   Neither builds a ``[tokens, d_sae]`` tensor.
2. The gather-dot kernel ``g = row_scale * col_scale * (W_dec[idx] . grad)``, or, for
   :meth:`CudaBackend.accumulate`, the same kernel adding straight into the per-latent
   statistics tables (atomics; a sort + per-latent segment kernel when deterministic results
   are asked for).

Threshold SAEs: the encode fills the request's ``k`` slots per row and returns every row's
count of active latents; the op sizes the slots.

The module is checked against the Python side when it loads: its top-k limit must be
:data:`gradsae.op.MAX_K` and its statistics tables those of :data:`gradsae.stats.FIELDS`, in
that order; a module built from other sources is refused with the difference as the reason.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..op.contract import MAX_K, Request, Selection
from ..stats import FIELDS
from . import chunked, cuda_stream

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_TOPK, MODE_THRESHOLD = 0, 1
# Largest scratch buffer of per-split partial results (bytes); rows are chunked to fit it.
PARTS_BUDGET = 256 << 20

_lib = None
_lib_error: str | None = None


def _mismatch(lib) -> str | None:
    """How the compiled module disagrees with the Python side, or None."""
    if lib.MAX_K != MAX_K:
        return f"it keeps top-k up to {lib.MAX_K}, gradsae.op.MAX_K is {MAX_K}"
    fields = tuple(getattr(lib, "STATS_FIELDS", ()))
    if fields != FIELDS:
        return f"its statistics tables are {fields}, gradsae.stats.FIELDS is {FIELDS}"
    return None


def _load():
    """The compiled module, or None (the reason is kept in ``_lib_error``)."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        import importlib.util

        if importlib.util.find_spec("gradsae._C") is None:
            _lib_error = "not built"
            return None
        try:
            from .. import _C
        except ImportError as e:
            _lib_error = str(e)
            return None
        why = _mismatch(_C)
        if why is not None:
            _lib_error = f"built from other sources than this gradsae ({why})"
            return None
        _lib = _C
    return _lib


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with unit stride along its last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned(*pairs) -> bool:
    """16-byte vector loads are legal: base pointers 16-byte aligned, row strides multiples of 8."""
    return all(t.data_ptr() % 16 == 0 and stride % 8 == 0 for t, stride in pairs)


def _smem_per_block(device) -> int | None:
    """The shared memory a block may opt in to on ``device`` (None: torch does not say)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def _tile_rows(lib, code: int, mode: int, kp: int, device) -> int | None:
    """Rows per fused encode CTA: 64 where the GPU has the shared memory for it, else 32
    (None: neither)."""
    have = _smem_per_block(device)
    for rows in (64, 32):
        if have is None or lib.encode_smem_bytes(code, mode, kp, rows) <= have:
            return rows
    return None


class _Launch:
    """Device index and current stream handle for kernel launches on ``device``."""

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.current_stream(self.index).cuda_stream


class CudaBackend:
    """CUDA C++ kernels (``gradsae._C``) for top-k (k <= 256) and threshold SAEs on GPUs of
    compute capability 8.0 or newer, in float32, float16 and bfloat16."""

    name = "cuda"

    # ------------------------------------------------------------------ dispatch
    def unsupported(self, req: Request) -> str | None:
        lib = _load()
        if lib is None:
            if _lib_error != "not built":
                return f"gradsae._C failed to import ({_lib_error}); rebuild with GRADSAE_BUILD_CUDA=1"
            return "gradsae._C is not built (reinstall with GRADSAE_BUILD_CUDA=1)"
        dev = req.x.device
        if dev.type != "cuda":
            return f"tensors are on {dev.type}"
        major, minor = torch.cuda.get_device_capability(dev)
        if major < 8:
            return f"needs a GPU of compute capability >= 8.0 (this one is {major}.{minor})"
        sae = req.sae
        if sae.dtype not in _CODES:
            return f"dtype {sae.dtype} is not supported (float32, float16, bfloat16)"
        if sae.d_sae >= 2**31 - 1 or sae.d_in >= 2**31 - 1:
            return f"d_in={sae.d_in}, d_sae={sae.d_sae}: dimensions must be below 2**31"
        if sae.activation == "topk" and req.k > MAX_K:
            return f"k={req.k} > {MAX_K} (the largest top-k the kernels keep per row)"
        if sae.activation == "topk":
            need, have = lib.stream_topk_smem_bytes(lib.topk_pad(req.k)), _smem_per_block(dev)
            if have is not None and need > have:
                return f"the streaming top-k needs {need} bytes of shared memory per block; this GPU allows {have}"
        return None

    def strategies(self, req: Request) -> tuple[str, ...]:
        """``chunked`` (the default), and ``fused`` where its encode tile fits the GPU's
        shared memory."""
        lib = _load()
        sae = req.sae
        topk = sae.activation == "topk"
        mode, kp = (MODE_TOPK, lib.topk_pad(req.k)) if topk else (MODE_THRESHOLD, 0)
        if _tile_rows(lib, _CODES[sae.dtype], mode, kp, req.x.device) is None:
            return ("chunked",)
        return ("chunked", "fused")

    def describe(self) -> dict:
        """Build facts for ``gradsae info``: compiled architectures, CUDA runtime version."""
        lib = _load()
        if lib is None:
            return {"built": False}
        v = lib.cuda_runtime_version()
        return {
            "built": True,
            "archs": lib.compiled_archs(),
            "cuda_runtime": f"{v // 1000}.{(v % 1000) // 10}",
            "max_k": MAX_K,
        }

    # ------------------------------------------------------------------ fused encode + selection
    def _plan(self, n: int, d_sae: int, tile_rows: int, slots: int, n_sm: int) -> tuple[int, int, int]:
        """(split_cols, n_splits, rows per chunk): enough CTAs to fill the GPU a few times over,
        partial results within PARTS_BUDGET."""
        tile_cols = _load().TILE_COLS
        row_blocks = -(-min(n, 1 << 16) // tile_rows)
        want_splits = max(1, -(-4 * n_sm // row_blocks))
        split_cols = -(-d_sae // want_splits)
        split_cols = -(-split_cols // tile_cols) * tile_cols
        n_splits = -(-d_sae // split_cols)
        rows = max(1, min(n, PARTS_BUDGET // (n_splits * min(slots, split_cols) * 8)))
        return split_cols, n_splits, rows

    def select(self, req: Request) -> Selection:
        if req.strategy not in (None, "chunked", "fused"):
            raise ValueError(f"unknown strategy {req.strategy!r}; the cuda backend has chunked and fused")
        # torch's current device follows the tensors', so both CUDA runtimes (torch's and the
        # module's static one) agree on the current context during and after the launches.
        with torch.cuda.device(req.x.device):
            if req.strategy == "fused":
                return self._fused_select(req)
            return chunked.select(req, cuda_stream.folds(_load()))

    def _fused_select(self, req: Request) -> Selection:
        lib = _load()
        sae = req.sae
        x = req.x
        launch = _Launch(x.device)
        code = _CODES[sae.dtype]
        W = _rows_contig(sae.W_enc)
        b = sae.b_enc.contiguous()
        scale = sae.decoder_norm().float().contiguous() if sae.rescale_acts_by_decoder_norm else None
        topk = sae.activation == "topk"
        thr = None if topk else sae.selection_threshold().float().contiguous()
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count
        k = req.k  # top-k, or the threshold capacity
        kp = lib.topk_pad(k) if topk else 0
        mode = MODE_TOPK if topk else MODE_THRESHOLD
        tile_rows = _tile_rows(lib, code, mode, kp, x.device)
        split_cols, n_splits, chunk = self._plan(req.n, sae.d_sae, tile_rows, kp if topk else k, n_sm)
        # top-k: kp keys per split; threshold: a split never holds more than its columns
        width = kp if topk else min(k, split_cols)

        idx_parts, act_parts, count_parts, scale_parts = [], [], [], []
        for r0 in range(0, req.n, chunk):
            rows = min(req.n, r0 + chunk) - r0
            sae_in, state = sae.preprocess(x[r0:r0 + rows])
            sae_in = _rows_contig(sae_in)
            parts = torch.empty((rows, n_splits, width), dtype=torch.int64, device=x.device)
            counts = None if topk else torch.empty((rows, n_splits), dtype=torch.int32, device=x.device)
            lib.encode_select(
                device=launch.index, stream=launch.stream, x=sae_in.data_ptr(), x_stride=sae_in.stride(0),
                w=W.data_ptr(), w_stride=W.stride(0), bias=b.data_ptr(), scale=_ptr(scale), thr=_ptr(thr),
                dtype=code, n=rows, d_in=sae.d_in, d_sae=sae.d_sae, mode=mode, k=k if topk else 0, kp=kp,
                cap=width, split_cols=split_cols, n_splits=n_splits, tile_rows=tile_rows,
                parts=parts.data_ptr(), counts=_ptr(counts),
                vec=_aligned((sae_in, sae_in.stride(0)), (W, W.stride(0))),
            )
            idx = torch.empty((rows, k), dtype=torch.int64, device=x.device)
            acts = torch.empty((rows, k), dtype=torch.float32, device=x.device)
            if topk:
                lib.merge_topk(device=launch.index, stream=launch.stream, parts=parts.data_ptr(), n=rows,
                               n_splits=n_splits, k=k, kp=kp, idx=idx.data_ptr(), acts=acts.data_ptr())
            else:
                row_counts = torch.empty(rows, dtype=torch.int32, device=x.device)
                lib.merge_threshold(device=launch.index, stream=launch.stream, parts=parts.data_ptr(),
                                    counts=counts.data_ptr(), n=rows, n_splits=n_splits, cap=width, cap_out=k,
                                    idx=idx.data_ptr(), acts=acts.data_ptr(), row_counts=row_counts.data_ptr())
                count_parts.append(row_counts)
            idx_parts.append(idx)
            act_parts.append(acts)
            scale_parts.append(state.row_scale)
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts)  # noqa: E731
        return Selection(
            cat(idx_parts), cat(act_parts),
            counts=cat(count_parts) if count_parts else None,
            row_scale=None if scale_parts[0] is None else cat(scale_parts).float(),
        )

    # ------------------------------------------------------------------ gather-dot
    def _gather_args(self, W_dec, idx, D, row_scale, col_scale):
        W = _rows_contig(W_dec)
        D = _rows_contig(D if D.dtype in _CODES else D.float())
        idx = idx.contiguous()
        rs = None if row_scale is None else row_scale.float().contiguous()
        cs = None if col_scale is None else col_scale.float().contiguous()
        n, K = idx.shape
        return dict(
            w=W.data_ptr(), w_stride=W.stride(0), w_dtype=_CODES[W.dtype], d=D.data_ptr(), d_stride=D.stride(0),
            d_dtype=_CODES[D.dtype], idx=idx.data_ptr(), n=n, K=K, d_in=W.shape[1], row_scale=_ptr(rs),
            col_scale=_ptr(cs), vec=_aligned((W, W.stride(0)), (D, D.stride(0))),
        ), (W, D, idx, rs, cs)  # keep the tensors alive until the launch is queued

    def gather_dot(self, W_dec, idx, D, row_scale=None, col_scale=None) -> torch.Tensor:
        """``g[n, s] = row_scale[n] * col_scale[idx] * (W_dec[idx[n, s]] . D[n])``, 0 where
        idx < 0, in float32 (see :meth:`gradsae.op.Backend.gather_dot`)."""
        lib = _load()
        if lib is None or not _on_gpu(W_dec) or W_dec.dtype not in _CODES:
            from .reference import gather_dot

            return gather_dot(W_dec, idx, D, row_scale, col_scale)
        n, K = idx.shape
        if idx.numel() and int(idx.max()) >= W_dec.shape[0]:
            raise InputError(f"indices reach {int(idx.max())} but the SAE has d_sae={W_dec.shape[0]} latents")
        out = torch.empty((n, K), dtype=torch.float32, device=idx.device)
        args, keep = self._gather_args(W_dec, idx, D, row_scale, col_scale)
        with torch.cuda.device(idx.device):
            launch = _Launch(idx.device)
            lib.gather_dot(device=launch.index, stream=launch.stream, out=out.data_ptr(), **args)
        del keep
        return out

    def influence(self, req: Request) -> Selection:
        sel = self.select(req)
        sel.grads = self.gather_dot(req.sae.W_dec, sel.indices, req.grad, sel.row_scale, req.sae.col_scale())
        return sel

    # ------------------------------------------------------------------ fused statistics
    def accumulate(self, req: Request, sel: Selection, tables: dict, mask: torch.Tensor | None,
                   keep_grads: bool = False) -> torch.Tensor | None:
        """Add the influence of ``sel`` to the statistics ``tables`` without materialising
        scores: the gather-dot kernel adds each active slot into them (atomics; with
        ``keep_grads`` it writes the grads in the same pass), or, with ``req.deterministic``,
        the scores are sorted by latent and each latent's entries reduced in input order."""
        with torch.cuda.device(req.x.device):
            return self._accumulate_on_device(req, sel, tables, mask, keep_grads)

    def _accumulate_on_device(self, req: Request, sel: Selection, tables: dict, mask, keep_grads: bool):
        lib = _load()
        sae = req.sae
        launch = _Launch(req.x.device)
        stats = tuple(tables[f].data_ptr() for f in FIELDS)  # the module's STATS_FIELDS order
        idx, acts = sel.indices, sel.acts
        if req.deterministic:
            grads = self.gather_dot(sae.W_dec, idx, req.grad, sel.row_scale, sae.col_scale())
            valid = idx >= 0
            if mask is not None:
                valid &= mask.unsqueeze(-1)
            j = idx[valid]
            a = acts[valid]
            s = (acts * grads)[valid]
            j, order = torch.sort(j, stable=True)
            a = a[order].contiguous()
            s = s[order].contiguous()
            lib.segment_stats(device=launch.index, stream=launch.stream, j=j.data_ptr(), acts=a.data_ptr(),
                              scores=s.data_ptr(), m=j.numel(), stats=stats)
            return grads if keep_grads else None
        out = torch.empty(idx.shape, dtype=torch.float32, device=idx.device) if keep_grads else None
        args, keep = self._gather_args(sae.W_dec, idx, req.grad, sel.row_scale, sae.col_scale())
        acts = acts.to(torch.float32).contiguous()
        lib.gather_dot(device=launch.index, stream=launch.stream, acts=acts.data_ptr(), mask=_ptr(mask),
                       stats=stats, out=_ptr(out), **args)
        del keep
        return out


BACKEND = CudaBackend()
