"""The Triton backend: encode + select, gather-dot, sparse decode and fused statistics
(kernels in ``gradsae.kernels``).

Two encode strategies (the op picks one per call, :mod:`gradsae.op.strategy`): ``fused``
(default), the encode GEMM with the selection in its epilogue
(:mod:`gradsae.kernels.encode_select`); ``chunked``, the vendor GEMM per chunk of latents and
the streaming folds of :mod:`gradsae.kernels.stream_select` (:mod:`.chunked`).

It serves CUDA tensors in float32 / bfloat16 / float16, and CPU tensors under
``TRITON_INTERPRET=1`` only when named explicitly (``backend="triton"``; the interpreter is
for tests, far too slow to be picked by ``auto``). Whatever it cannot serve it says why, and
the dispatcher falls through to the next backend (in the end the reference).

Threshold SAEs: the encode fills the request's ``k`` slots per row and counts every row's
active latents (the counters keep counting past ``k``); the op sizes the slots.
"""

from __future__ import annotations

import torch

from ..op.contract import MAX_K, Request, Selection
from . import chunked

try:
    from .. import kernels
    from ..kernels import stream_select
    from ..kernels.tuning import interpreting

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the environment
    kernels = None
    _IMPORT_ERROR = f"triton is not installed ({type(e).__name__}: {e})"

    def interpreting() -> bool:
        return False


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D_SAE = (1 << 31) - 1


class TritonBackend:
    """Triton kernels behind the influence contract (see :mod:`gradsae.backends`)."""

    name = "triton"

    # ------------------------------------------------------------------ capability
    def unsupported(self, req: Request) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        sae = req.sae
        dev = req.x.device
        if dev.type == "cpu":
            if not interpreting():
                return "tensors are on cpu and TRITON_INTERPRET is not set"
            if not req.explicit:
                return "tensors are on cpu: the Triton interpreter serves only backend='triton' (too slow for auto)"
        elif dev.type != "cuda":
            return f"tensors are on {dev.type}; Triton needs a CUDA device"
        elif interpreting():
            return "TRITON_INTERPRET is set, so Triton cannot run on the CUDA device"
        if sae.dtype not in SUPPORTED_DTYPES:
            return f"dtype {sae.dtype} unsupported (float32, bfloat16, float16 only)"
        if dev.type == "cuda" and sae.dtype == torch.bfloat16:
            major, minor = torch.cuda.get_device_capability(dev)
            if major < 8:
                return f"bfloat16 needs compute capability >= 8.0, this device has {major}.{minor}"
        if sae.activation == "topk" and req.k > MAX_K:
            return f"k={req.k} > {MAX_K}"
        if sae.d_sae > MAX_D_SAE:
            return f"d_sae={sae.d_sae} > {MAX_D_SAE}"
        return None

    def strategies(self, req: Request) -> tuple[str, ...]:
        """``fused`` (the default) and ``chunked``: both serve every input this backend does."""
        return ("fused", "chunked")

    # ------------------------------------------------------------------ the contract
    def select(self, req: Request) -> Selection:
        sae = req.sae
        if req.strategy == "chunked":
            return chunked.select(req, stream_select)
        if req.strategy not in (None, "fused"):
            raise ValueError(f"unknown strategy {req.strategy!r}; the triton backend has fused and chunked")
        a, bias, row_scale = chunked.encoder_input(sae, req.x)
        dec_norm = sae.decoder_norm().float() if sae.rescale_acts_by_decoder_norm else None
        det = req.deterministic
        if sae.activation == "topk":
            acts, idx = kernels.encode_topk(a, sae.W_enc, bias, req.k, dec_norm, deterministic=det)
            return Selection(idx, acts, None, row_scale)
        thr = sae.cached("kernel_thr", lambda: sae.selection_threshold().float())
        acts, idx, counts = kernels.encode_threshold(a, sae.W_enc, bias, thr, req.k, dec_norm, deterministic=det)
        return Selection(idx, acts, counts, row_scale)

    def influence(self, req: Request) -> Selection:
        sel = self.select(req)
        sel.grads = self.gather_dot(req.sae.W_dec, sel.indices, req.grad, sel.row_scale, req.sae.col_scale())
        return sel

    # ------------------------------------------------------------------ optional methods
    def gather_dot(self, W_dec, idx, D, row_scale=None, col_scale=None) -> torch.Tensor:
        """``row_scale * col_scale[idx] * (W_dec[idx] . D)``, float32 ``[N, K]``."""
        return kernels.gather_dot(W_dec, idx, D, row_scale, col_scale)

    def decode_sparse(self, sae, idx, acts):
        """``(acts * col_scale[idx]) @ W_dec[idx] + b_dec`` (before de-normalisation),
        differentiable in ``acts`` with the gather-dot as its backward."""
        lead = idx.shape[:-1]
        K = idx.shape[-1]
        out = kernels.SparseDecode.apply(
            idx.reshape(-1, K), acts.reshape(-1, K), sae.W_dec, sae.b_dec, sae.col_scale()
        )
        return out.reshape(*lead, sae.d_in)

    def accumulate(self, req: Request, sel: Selection, tables: dict, mask: torch.Tensor | None,
                   keep_grads: bool = False) -> torch.Tensor | None:
        """The influence of ``sel`` added into ``tables`` without per-token scores on the host:
        the gather-dot adds into them with float64 atomics (and writes ``grads`` in the same
        pass with ``keep_grads``) or, with ``req.deterministic``, the scores go through a
        sorted segmented reduction (bitwise repeatable)."""
        sae = req.sae
        if req.deterministic:
            g, s = kernels.gather_dot(sae.W_dec, sel.indices, req.grad, sel.row_scale, sae.col_scale(), sel.acts)
            kernels.accumulate_sorted(tables, sel.indices, sel.acts, s, mask)
            return g if keep_grads else None
        out = kernels.gather_dot(sae.W_dec, sel.indices, req.grad, sel.row_scale, sae.col_scale(), sel.acts,
                                 stats=tables, row_mask=mask, write=keep_grads)
        return out[0] if keep_grads else None

    def describe(self) -> dict:
        """Versions and where the kernels would run."""
        info = {"name": self.name, "available": _IMPORT_ERROR is None, "interpreter": interpreting()}
        if _IMPORT_ERROR is not None:
            info["reason"] = _IMPORT_ERROR
            return info
        import triton

        info["triton"] = triton.__version__
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["max_k"] = MAX_K
        return info


BACKEND = TritonBackend()
