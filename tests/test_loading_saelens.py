"""SAELens checkpoints (cfg.json + sae_weights.safetensors, every architecture and config
generation) load with the library's own formula evaluated from the raw arrays on disk, and
keep their metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from gradsae import load_sae

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64, check_meta, close, relu, topk_dense, xs


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    w = sf.write_saelens(tmp_path / "sae", "standard", D_IN, D_SAE, apply_b_dec_to_input=apply_b_dec)
    sae = load_sae(tmp_path / "sae", dtype=F64)
    x = xs()
    h = x - w["b_dec"] if apply_b_dec else x
    z = relu(h @ w["W_enc"] + w["b_enc"])
    assert sae.activation == "relu"
    close(sae.encode(x), z)
    close(sae.decode(z), z @ w["W_dec"] + w["b_dec"])
    check_meta(sae, "blocks.3.hook_resid_post", "gpt2", 3)
    assert sae.meta.extra["context_size"] == 128


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk(tmp_path, rescale):
    w = sf.write_saelens(tmp_path / "sae", "topk", D_IN, D_SAE, k=5, rescale_acts_by_decoder_norm=rescale,
                         hook_name="blocks.7.hook_mlp_out", model_name="pythia-70m")
    sae = load_sae(tmp_path / "sae" / "sae_weights.safetensors", dtype=F64)  # the weights file itself
    x = xs()
    n = w["W_dec"].norm(dim=-1)
    v = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if rescale:
        v = v * n
    z = topk_dense(v, 5)
    assert sae.k == 5 and sae.rescale_acts_by_decoder_norm == rescale
    close(sae.encode(x), z)
    zz = z / n if rescale else z
    close(sae.decode(z), zz @ w["W_dec"] + w["b_dec"])
    check_meta(sae, "blocks.7.hook_mlp_out", "pythia-70m", 7)


@pytest.mark.parametrize("threshold_key", ["threshold", "log_threshold"])
def test_saelens_jumprelu(tmp_path, threshold_key):
    w = sf.write_saelens(tmp_path / "sae", "jumprelu", D_IN, D_SAE, threshold_key=threshold_key,
                         apply_b_dec_to_input=False)
    sae = load_sae(tmp_path / "sae", format="saelens", dtype=F64)
    x = xs()
    pre = x @ w["W_enc"] + w["b_enc"]
    z = relu(pre) * (pre > w["threshold"])
    close(sae.encode(x), z, 1e-6 if threshold_key == "log_threshold" else 1e-10)
    close(sae.decode(z), z @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_saelens_input_normalisation(tmp_path, norm):
    w = sf.write_saelens(tmp_path / "sae", "standard", D_IN, D_SAE, normalize_activations=norm)
    sae = load_sae(tmp_path / "sae", dtype=F64)
    x = xs() * 3 + 1
    if norm == "constant_norm_rescale":
        c = math.sqrt(D_IN) / x.norm(dim=-1, keepdim=True)
        h, undo = x * c, (lambda y: y / c)
    else:
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        h, undo = (x - mu) / (sd + 1e-5), (lambda y: y * sd + mu)
    z = relu((h - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    close(sae.encode(x), z)
    close(sae.decode(z, x), undo(z @ w["W_dec"] + w["b_dec"]))


def test_saelens_expected_average_only_in(tmp_path):
    # intermediate training checkpoint: unfolded weights + activation_scaler.json
    w = sf.write_saelens(tmp_path / "a", "standard", D_IN, D_SAE, normalize_activations="expected_average_only_in")
    s = 0.37
    (tmp_path / "a" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    sae = load_sae(tmp_path / "a", dtype=F64)
    x = xs()
    z_train = relu((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # what training saw
    # the fold is done in the stored float32, hence the tolerance
    close(sae.encode(x), z_train, 1e-6)
    close(sae(x), (z_train @ w["W_dec"] + w["b_dec"]) / s, 1e-6)
    assert sae.normalize_activations == "none" and sae.meta.extra["folded_scaling_factor"] == s
    # without a scaler the weights are used as they are (SAELens applies no scaling at inference)
    w2 = sf.write_saelens(tmp_path / "b", "standard", D_IN, D_SAE, normalize_activations="expected_average_only_in")
    sae2 = load_sae(tmp_path / "b", dtype=F64)
    close(sae2.encode(x), relu((x - w2["b_dec"]) @ w2["W_enc"] + w2["b_enc"]))
    assert sae2.meta.extra["normalize_activations"] == "expected_average_only_in"


def test_saelens_pre6_topk(tmp_path):
    w = sf.write_saelens_pre6(tmp_path / "sae", D_IN, D_SAE, activation_fn_str="topk", k=3)
    sae = load_sae(tmp_path / "sae", dtype=F64)
    x = xs()
    z = topk_dense((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 3)
    assert sae.activation == "topk" and sae.k == 3
    close(sae.encode(x), z)
    close(sae.decode(z), z @ w["W_dec"] + w["b_dec"])
    check_meta(sae, "blocks.2.hook_resid_pre", "gpt2-small", 2)


def test_saelens_hook_z_is_flagged(tmp_path):
    sf.write_saelens_pre6(tmp_path / "sae", D_IN, D_SAE, hook_point="blocks.4.attn.hook_z", hook_point_layer=4)
    sae = load_sae(tmp_path / "sae")
    assert sae.meta.extra["reshape_activations"] == "hook_z" and sae.meta.hook_layer == 4
    sae.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["reshape_activations"] == "hook_z"


def test_saelens_pre6_finetuning_scaling_factor(tmp_path):
    s = torch.rand(D_SAE) + 0.5
    w = sf.write_saelens_pre6(tmp_path / "sae", D_IN, D_SAE, scaling_factor=s, normalize_activations="none")
    sae = load_sae(tmp_path / "sae", dtype=F64)
    x = xs()
    z = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    close(sae.encode(x), z)
    close(sae.decode(z), (z * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"], 1e-6)


def test_saelens_batchtopk_training_checkpoint(tmp_path):
    # TrainingSAE.save_model of a BatchTopK SAE: architecture "batchtopk", float k,
    # decoder-norm rescaling, and the running threshold as a float64 scalar buffer
    folder = tmp_path / "sae"
    folder.mkdir()
    w = {"W_enc": sf.rand(D_IN, D_SAE), "b_enc": sf.rand(D_SAE, scale=0.1), "W_dec": sf.rand(D_SAE, D_IN, scale=0.3),
         "b_dec": sf.rand(D_IN, scale=0.1), "topk_threshold": torch.tensor(0.4, dtype=F64)}
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "k": 4.0,
           "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01, "architecture": "batchtopk",
           "metadata": {"sae_lens_version": "6.12.0", "hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder, dtype=F64)
    x = xs()
    W = {k: v.to(F64) for k, v in w.items()}
    n = W["W_dec"].norm(dim=-1)
    v = ((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]) * n
    z = relu(v) * (relu(v) > 0.4)
    close(sae.encode(x), z)
    close(sae.decode(z), (z / n) @ W["W_dec"] + W["b_dec"])
    check_meta(sae, "blocks.0.hook_resid_post", "tiny", 0)
