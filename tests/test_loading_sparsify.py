"""sparsify checkpoints (cfg.json + sae.safetensors per hookpoint) load with the library's own
formula evaluated from the raw arrays on disk; what gradsae cannot express is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gradsae import SAEFormatError, load_sae

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64, check_meta, close, relu, xs


@pytest.mark.parametrize("hookpoint,layer", [("layers.6", 6), ("layers.10.mlp", 10)])
def test_sparsify(tmp_path, hookpoint, layer):
    w = sf.write_sparsify(tmp_path / "run", hookpoint, D_IN, D_SAE, k=6)
    sae = load_sae(tmp_path / "run" / hookpoint, dtype=F64)
    x = xs()
    pre = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    idx = pre.topk(6, dim=-1).indices
    z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    close(sae.encode(x), z)
    # decode = acts @ W_dec + b_dec, W_dec stored [d_sae, d_in] (no transpose)
    close(sae.decode(z), z @ w["W_dec"] + w["b_dec"])
    check_meta(sae, hookpoint, "EleutherAI/pythia-70m", layer)


def test_sparsify_keeps_bfloat16(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.1", D_IN, D_SAE, k=4, dtype=torch.bfloat16, model=None)
    sae = load_sae(tmp_path / "run" / "layers.1" / "sae.safetensors")
    raw = load_file(str(tmp_path / "run" / "layers.1" / "sae.safetensors"))
    assert sae.dtype == torch.bfloat16 and sae.meta.model_name is None
    assert torch.equal(sae.W_enc, raw["encoder.weight"].T) and torch.equal(sae.W_dec, raw["W_dec"])


@pytest.mark.parametrize("override,word", [
    ({"skip_connection": True}, "skip connection"),
    ({"activation": "groupmax"}, "groupmax"),
])
def test_sparsify_unsupported(tmp_path, override, word):
    sf.write_sparsify(tmp_path / "run", "layers.2", D_IN, D_SAE, k=4, cfg_overrides=override)
    with pytest.raises(SAEFormatError, match=word) as e:
        load_sae(tmp_path / "run" / "layers.2")
    assert "cfg.json" in str(e.value)
