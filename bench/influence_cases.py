"""The variants the influence benchmarks compare, shared by bench/run.py and the
pytest-benchmark file.

- ``gradsae``: ``gradsae.influence`` (the op under test, backend chosen by the caller);
- ``dense``: the dense PyTorch anchor people write today: dense pre-activations, dense top-k
  latents, the dense gradient ``grad @ W_dec.T``, the product;
- ``gemm``: the bare encode GEMM ``(x - b_dec) @ W_enc + b_enc`` — the unavoidable work.
"""

from __future__ import annotations

import torch

import gradsae


def make_inputs(T: int, d_in: int, d_sae: int, k: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    sae = gradsae.SAE(r(d_in, d_sae) / d_in**0.5, r(d_sae) * 0.1, r(d_sae, d_in) / d_in**0.5, r(d_in) * 0.1,
                      "topk", k=k)
    return sae, r(T, d_in), r(T, d_in)


def run_gradsae(sae, x, grad, backend="auto"):
    return gradsae.influence(x, grad, sae, backend=backend, check_finite=False)


def run_dense(sae, x, grad):
    pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    dz = grad @ sae.W_dec.T
    return z * dz


def run_gemm(sae, x, grad):
    return torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)


VARIANTS = {"gradsae": run_gradsae, "dense": run_dense, "gemm": run_gemm}
