"""The Triton backend: fused encode + select, gather-dot, sparse decode and fused statistics
(kernels in ``gradsae.kernels``).

It serves CUDA tensors in float32 / bfloat16 / float16, and CPU tensors under
``TRITON_INTERPRET=1`` only when named explicitly (``backend="triton"``; the interpreter is
for tests, far too slow to be picked by ``auto``). Whatever it cannot serve it says why, and
the dispatcher falls through to the next backend (in the end the reference).

Threshold SAEs: with a capacity ``k`` an overflowing row raises :class:`CapacityError`;
with ``k=None`` the output is sized exactly: a first pass with a guessed capacity counts every
row's active latents, and a row that did not fit triggers one more pass at the exact size.
"""

from __future__ import annotations

import os

import torch

from ..errors import CapacityError
from . import Request, register_backend

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"triton is not installed ({type(e).__name__}: {e})"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 256
MAX_D_SAE = (1 << 31) - 1
# First-pass capacity for exactly sized threshold outputs.
INITIAL_CAPACITY = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    from gradsae import kernels

    return kernels


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
            if not _interpreting():
                return "tensors are on cpu and TRITON_INTERPRET is not set"
            if not req.explicit:
                return "tensors are on cpu: the Triton interpreter serves only backend='triton' (too slow for auto)"
        elif dev.type != "cuda":
            return f"tensors are on {dev.type}; Triton needs a CUDA device"
        elif _interpreting():
            return "TRITON_INTERPRET is set, so Triton cannot run on the CUDA device"
        if sae.dtype not in SUPPORTED_DTYPES:
            return f"dtype {sae.dtype} unsupported (float32, bfloat16, float16 only)"
        if dev.type == "cuda" and sae.dtype == torch.bfloat16:
            major, minor = torch.cuda.get_device_capability(dev)
            if major < 8:
                return f"bfloat16 needs compute capability >= 8.0, this device has {major}.{minor}"
        if sae.activation == "topk" and req.k is not None and req.k > MAX_K:
            return f"k={req.k} > {MAX_K}"
        if sae.d_sae > MAX_D_SAE:
            return f"d_sae={sae.d_sae} > {MAX_D_SAE}"
        return None

    # ------------------------------------------------------------------ helpers
    def _encoder_input(self, sae, x: torch.Tensor):
        """(encoder input, fp32 bias, row_scale). Without normalisation, b_dec is folded into
        the bias in fp32, ``(x - b_dec) @ W = x @ W - b_dec @ W``, so x goes to the GEMM as is."""
        if sae.normalize_activations == "none":
            a = x.to(sae.dtype)
            if sae.apply_b_dec_to_input:
                tag = f"triton_bias:{sae.b_dec.data_ptr()}:{sae.b_dec._version}:{sae.b_enc.data_ptr()}:{sae.b_enc._version}"
                bias = sae._cached(
                    tag, lambda: sae.b_enc.float() - sae.b_dec.float() @ sae.W_enc.float()
                )
            else:
                bias = sae._cached("triton_benc", lambda: sae.b_enc.float())
            return a, bias, None
        a, state = sae.preprocess(x)
        return a, sae._cached("triton_benc", lambda: sae.b_enc.float()), state.row_scale

    def _select(self, req: Request):
        """(indices int64 [N, K], acts float32 [N, K], row_scale or None)."""
        k = _kernels()
        sae = req.sae
        a, bias, row_scale = self._encoder_input(sae, req.x)
        dec_norm = sae.decoder_norm().float() if sae.rescale_acts_by_decoder_norm else None
        det = req.deterministic
        if sae.activation == "topk":
            acts, idx = k.encode_topk(a, sae.W_enc, bias, req.k, dec_norm, deterministic=det)
            return idx, acts, row_scale
        thr = sae._cached("triton_thr", lambda: sae.selection_threshold().float())
        cap = req.k if req.k is not None else min(sae.d_sae, INITIAL_CAPACITY)
        acts, idx, counts = k.encode_threshold(a, sae.W_enc, bias, thr, cap, dec_norm, deterministic=det)
        fullest = int(counts.max()) if counts.numel() else 0
        if req.k is not None:
            if fullest > req.k:
                bad = int(counts.argmax())
                raise CapacityError(
                    f"token {bad} has {fullest} active latents but the capacity is k={req.k}; "
                    f"pass k>={fullest} (or k=None to size the output to the fullest row)"
                )
            return idx, acts, row_scale
        if fullest > cap:  # exact sizing: one more pass at the size now known
            acts, idx, counts = k.encode_threshold(a, sae.W_enc, bias, thr, fullest, dec_norm, deterministic=det)
        K = max(fullest, 1)
        return idx[:, :K].contiguous(), acts[:, :K].contiguous(), row_scale

    # ------------------------------------------------------------------ the contract
    def select(self, req: Request):
        idx, acts, _ = self._select(req)
        return idx, acts

    def influence(self, req: Request):
        idx, acts, row_scale = self._select(req)
        sae = req.sae
        grads = _kernels().gather_dot(sae.W_dec, idx, req.grad, row_scale, sae.col_scale())
        return idx, acts, grads

    # ------------------------------------------------------------------ optional methods
    def gather_dot(self, W_dec, idx, D, row_scale=None, col_scale=None):
        """``row_scale * col_scale[idx] * (W_dec[idx] . D)``, float32 ``[N, K]``."""
        return _kernels().gather_dot(W_dec, idx, D, row_scale, col_scale)

    def decode_sparse(self, sae, idx, acts):
        """``(acts * col_scale[idx]) @ W_dec[idx] + b_dec`` (before de-normalisation),
        differentiable in ``acts`` with the gather-dot as its backward."""
        lead = idx.shape[:-1]
        K = idx.shape[-1]
        out = _kernels().SparseDecode.apply(
            idx.reshape(-1, K), acts.reshape(-1, K), sae.W_dec, sae.b_dec, sae.col_scale()
        )
        return out.reshape(*lead, sae.d_in)

    def accumulate(self, req: Request, stats, mask: torch.Tensor | None = None) -> None:
        """Influence of ``req`` added into ``stats`` (a LatentStats) without materialising
        scores on the host: the gather-dot adds into per-latent tables with float64 atomics,
        or, with ``req.deterministic``, a sorted segmented reduction (bitwise repeatable).
        ``mask`` ``[N]`` (bool) selects the rows that count."""
        from ..stats import LatentStats

        kern = _kernels()
        sae = req.sae
        idx, acts, row_scale = self._select(req)
        dev = idx.device
        direct = all(
            t.device == dev and (t.dtype == torch.float64 or f == "count")
            for f, t in stats.to_dict().items()
        )
        target = stats if direct else LatentStats(sae.d_sae, device=dev)
        tables = target.to_dict()
        if req.deterministic:
            g, s = kern.gather_dot(sae.W_dec, idx, req.grad, row_scale, sae.col_scale(), acts)
            kern.accumulate_sorted(tables, idx, acts, s, mask)
        else:
            kern.gather_dot(sae.W_dec, idx, req.grad, row_scale, sae.col_scale(), acts,
                            stats=tables, row_mask=mask, write=False)
        n_rows = int(mask.sum()) if mask is not None else req.n
        if direct:
            stats.tokens += n_rows
        else:
            target.tokens = n_rows
            stats.merge(target)

    def describe(self) -> dict:
        """Versions and where the kernels would run."""
        info = {"name": self.name, "available": _IMPORT_ERROR is None, "interpreter": _interpreting()}
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


register_backend(TritonBackend())
