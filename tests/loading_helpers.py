"""Shared by the loader tests (tests/test_loading_*.py): the sizes of the SAEs written by
tests/sae_files.py and the formulas and checks every format's test uses."""

from __future__ import annotations

import torch

D_IN, D_SAE = 12, 48
F64 = torch.float64


def relu(t):
    return torch.clamp(t, min=0)


def topk_dense(v, k):
    """relu of the k largest entries of each row, zeros elsewhere."""
    idx = v.topk(k, dim=-1).indices
    return torch.zeros_like(v).scatter(-1, idx, relu(v.gather(-1, idx)))


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.to(F64) - b.to(F64)).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


def xs(n=7):
    return torch.randn(n, D_IN, dtype=F64)


def check_meta(sae, hook_name, model_name, hook_layer):
    assert sae.meta.hook_name == hook_name
    assert sae.meta.model_name == model_name
    assert sae.meta.hook_layer == hook_layer
