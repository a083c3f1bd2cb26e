"""dictionary_learning checkpoints (ae.pt + config.json) load with each dictionary class's own
encode, evaluated from the raw state dict on disk."""

from __future__ import annotations

import json

import pytest
import torch

from gradsae import SAEFormatError, load_sae

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64, check_meta, close, relu, xs


def _dl_check(sae, w, dict_class, x):
    if dict_class == "AutoEncoder":
        f = relu((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"])
        x_hat = f @ w["decoder.weight"].T + w["bias"]
        n = w["decoder.weight"].norm(dim=0)  # from_pretrained normalises the decoder
        close(sae.encode(x), f * n, 1e-6)  # normalised in the stored float32, as the library does
        close(sae.decode(f * n), x_hat, 1e-6)
        return
    if dict_class == "AutoEncoderNew":
        f = relu(x @ w["encoder.weight"].T + w["encoder.bias"])
        x_hat = f @ w["decoder.weight"].T + w["decoder.bias"]
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        if dict_class == "AutoEncoderTopK":
            top = post.topk(int(w["k"]), dim=-1)
            f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
        else:
            f = post * (post > w["threshold"])
        x_hat = f @ w["decoder.weight"].T + w["b_dec"]
    elif dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        f = post * (post > w["threshold"])
        x_hat = f @ w["W_dec"] + w["b_dec"]
    else:  # JumpReluAutoEncoder, apply_b_dec_to_input False
        pre = x @ w["W_enc"] + w["b_enc"]
        f = relu(pre * (pre > w["threshold"]))
        x_hat = f @ w["W_dec"] + w["b_dec"]
    close(sae.encode(x), f)
    close(sae.decode(f), x_hat)


@pytest.mark.parametrize("dict_class", [
    "AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder",
])
def test_dictionary_learning(tmp_path, dict_class):
    w = sf.write_dictionary_learning(tmp_path / "trainer_0", dict_class, D_IN, D_SAE, k=5, threshold=0.15, layer=4,
                                     submodule_name="gpt_neox.layers.4")
    sae = load_sae(tmp_path / "trainer_0", dtype=F64)
    _dl_check(sae, w, dict_class, xs())
    check_meta(sae, "gpt_neox.layers.4", "EleutherAI/pythia-70m-deduped", 4)
    assert sae.meta.extra["config"]["trainer"]["dict_class"] == dict_class
    assert load_sae(tmp_path / "trainer_0" / "ae.pt", format="dictionary_learning").dtype == torch.float32


def test_dictionary_learning_intermediate_checkpoint(tmp_path):
    # trainSAE's checkpoints/ae_<step>.pt: the run's config.json is one level up
    w = sf.write_dictionary_learning(tmp_path / "trainer_0", "AutoEncoderTopK", D_IN, D_SAE, k=3)
    (tmp_path / "trainer_0" / "checkpoints").mkdir()
    (tmp_path / "trainer_0" / "ae.pt").rename(tmp_path / "trainer_0" / "checkpoints" / "ae_1000.pt")
    sae = load_sae(tmp_path / "trainer_0" / "checkpoints" / "ae_1000.pt", dtype=F64)
    _dl_check(sae, w, "AutoEncoderTopK", xs())
    assert sae.k == 3


def test_dictionary_learning_batchtopk_unset_threshold_keeps_positive_latents(tmp_path):
    w = sf.write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", D_IN, D_SAE, threshold=-1.0)
    sae = load_sae(tmp_path / "t", dtype=F64)
    x = xs()
    post = relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    close(sae.encode(x), post * (post > -1.0))


def test_dictionary_learning_k_disagreement(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoderTopK", D_IN, D_SAE, k=5)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["trainer"]["k"] = 7
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"k=5.*k=7"):
        load_sae(tmp_path / "t")


def test_dictionary_learning_unsupported_class(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "IdentityDict"
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="IdentityDict") as e:
        load_sae(tmp_path / "t")
    assert "config.json" in str(e.value)
