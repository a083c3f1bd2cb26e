"""Triton kernels of gradsae, installed as ``gradsae.kernels``.

- :mod:`.encode_select`: the encode GEMM with top-k / threshold selection in its epilogue.
- :mod:`.topk`: packed value/index keys, the bitonic running top-k, the partial merge.
- :mod:`.gather_dot`: ``W_dec[idx] . grad`` for the active latents, scores, fused stats.
- :mod:`.stats`: the deterministic per-latent reduction.
- :mod:`.sparse_decode`: embedding-bag decode, differentiable through the gather-dot.
- :mod:`.tuning`: autotune configurations and interpreter detection.
"""

from .encode_select import encode_threshold, encode_topk
from .gather_dot import gather_dot
from .sparse_decode import SparseDecode, sparse_decode
from .stats import accumulate_sorted

__all__ = ["encode_topk", "encode_threshold", "gather_dot", "sparse_decode", "SparseDecode", "accumulate_sorted"]
