"""Gemma Scope parameters (params.npz, params.safetensors) load as JumpReLU SAEs with the
formula evaluated from the raw arrays on disk; the layer comes from the folder name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsae import SAEFormatError, load_sae

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64, check_meta, close, relu, xs


def _gemma_formula(sae, w):
    x = xs()
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction
    z = (pre > w["threshold"]) * relu(pre)
    close(sae.encode(x), z, 1e-12)
    close(sae.decode(z), z @ w["W_dec"] + w["b_dec"], 1e-12)


def test_gemmascope_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    w = sf.write_gemmascope_npz(folder, D_IN, D_SAE)
    sae = load_sae(folder / "params.npz", dtype=F64)
    assert sae.activation == "jumprelu" and not sae.apply_b_dec_to_input
    _gemma_formula(sae, w)
    check_meta(sae, "blocks.12.hook_resid_post", "gemma-2-2b", 12)
    assert load_sae(folder).dtype == torch.float32  # directory, stored dtype


def test_gemmascope2_safetensors(tmp_path):
    folder = tmp_path / "gemma-scope-2-1b-it" / "resid_post" / "layer_7_width_16k_l0_big"
    w = sf.write_gemmascope2(folder, D_IN, D_SAE)
    sae = load_sae(folder, dtype=F64)
    _gemma_formula(sae, w)
    check_meta(sae, "blocks.7.hook_resid_post", "gemma-3-1b-it", 7)
    assert sae.meta.extra["config"]["width"] == D_SAE


def test_gemmascope_unknown_array(tmp_path):
    folder = tmp_path / "layer_3"
    a = {k: v.numpy().astype(np.float32) for k, v in sf.write_gemmascope_npz(folder, D_IN, D_SAE).items()}
    np.savez(folder / "params.npz", w_gate=np.zeros((D_IN, D_IN), np.float32), **a)
    with pytest.raises(SAEFormatError, match="w_gate|W_gate"):
        load_sae(folder)
    # a skip connection of the wrong shape (transcoders: test_loading_transcoders.py)
    np.savez(folder / "params.npz", affine_skip_connection=np.zeros((D_IN, D_IN + 1), np.float32), **a)
    with pytest.raises(SAEFormatError, match="affine_skip_connection"):
        load_sae(folder)
