"""Loaders: every format round-trips against the library's own formula evaluated from the raw
arrays on disk, metadata is kept, SAE.save writes SAELens layout, and every kind of bad file
raises SAEFormatError naming the file and the problem."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gradsae
from gradsae import SAE, SAEFormatError, load_sae
from gradsae.errors import InputError

import sae_files as sf

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


# ======================================================================== SAELens
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


# ======================================================================== sparsify
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
    ({"transcode": True}, "transcoder"),
    ({"skip_connection": True}, "skip connection"),
    ({"activation": "groupmax"}, "groupmax"),
])
def test_sparsify_unsupported(tmp_path, override, word):
    sf.write_sparsify(tmp_path / "run", "layers.2", D_IN, D_SAE, k=4, cfg_overrides=override)
    with pytest.raises(SAEFormatError, match=word) as e:
        load_sae(tmp_path / "run" / "layers.2")
    assert "cfg.json" in str(e.value)


# ======================================================================== Gemma Scope
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
    np.savez(folder / "params.npz", affine_skip_connection=np.zeros((D_IN, D_IN), np.float32), **a)
    with pytest.raises(SAEFormatError, match="affine_skip_connection"):
        load_sae(folder)


# ======================================================================== dictionary_learning
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


# ======================================================================== SAE.save
def _random_sae(activation, rescale=False, normalize="none"):
    kw = {}
    if activation == "topk":
        kw["k"] = 5
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(D_SAE, dtype=F64) * 0.3
    return SAE(sf.rand(D_IN, D_SAE, dtype=F64), sf.rand(D_SAE, scale=0.1, dtype=F64),
               sf.rand(D_SAE, D_IN, scale=0.3, dtype=F64), sf.rand(D_IN, scale=0.1, dtype=F64),
               activation=activation, rescale_acts_by_decoder_norm=rescale, normalize_activations=normalize,
               hook_name="blocks.5.hook_resid_post", model_name="gpt2", hook_layer=5,
               metadata={"note": "kept", "nested": {"a": [1, 2]}}, **kw)


@pytest.mark.parametrize("activation,rescale,normalize", [
    ("relu", False, "none"), ("relu", True, "layer_norm"), ("topk", True, "none"),
    ("topk", False, "constant_norm_rescale"), ("jumprelu", False, "none"), ("jumprelu", True, "none"),
])
def test_save_roundtrip(tmp_path, activation, rescale, normalize):
    sae = _random_sae(activation, rescale, normalize)
    sae.save(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["cfg.json", "sae_weights.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # no temp leftovers
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    raw = {k: v.to(F64) for k, v in load_file(str(tmp_path / "out" / "sae_weights.safetensors")).items()}
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[activation]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["normalize_activations"] == normalize
    assert cfg["metadata"]["hook_name"] == "blocks.5.hook_resid_post" and cfg["metadata"]["note"] == "kept"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # parsed as a >= 6.0 config
    assert raw["W_enc"].shape == (D_IN, D_SAE) and raw["W_dec"].shape == (D_SAE, D_IN)

    # the files, read as SAELens reads them, give the original SAE's latents and reconstruction
    x = xs() * 2 + 0.5
    h, _ = sae.preprocess(x)
    pre = h @ raw["W_enc"] + raw["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * raw["W_dec"].norm(dim=-1)
    if activation == "relu":
        z = relu(pre)
    elif activation == "topk":
        z = topk_dense(pre, cfg["k"])
    else:
        z = relu(pre) * (pre > raw["threshold"])
    close(z, sae.encode(x))
    zz = z / raw["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else z
    close(sae.norm_state(x).apply(zz @ raw["W_dec"] + raw["b_dec"]), sae(x))

    back = load_sae(tmp_path / "out")
    assert back.dtype == F64 and back.activation == activation
    close(back.encode(x), sae.encode(x))
    close(back(x), sae(x))
    check_meta(back, "blocks.5.hook_resid_post", "gpt2", 5)
    assert back.meta.extra["nested"] == {"a": [1, 2]}


def test_save_roundtrip_of_loaded_sparsify(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.3", D_IN, D_SAE, k=4)
    sae = load_sae(tmp_path / "run" / "layers.3")
    sae.save(tmp_path / "as_saelens")
    back = load_sae(tmp_path / "as_saelens")
    x = xs().float()
    close(back.encode(x), sae.encode(x), 0)
    check_meta(back, "layers.3", "EleutherAI/pythia-70m", 3)


def test_save_replaces_existing_directory_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    _random_sae("topk").save(out)
    (out / "sparsity.safetensors").write_bytes(b"user file")
    new = _random_sae("jumprelu")
    new.save(out)
    assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    x = xs()
    close(load_sae(out).encode(x), new.encode(x))


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _random_sae("relu").save(tmp_path / "out")
    assert os.listdir(tmp_path) == []
    # into an existing directory: the old files stay intact, no temporaries remain
    monkeypatch.undo()
    old = _random_sae("relu")
    old.save(tmp_path / "out")
    before = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        _random_sae("topk").save(tmp_path / "out")
    after = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    assert after == before


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        _random_sae("relu").save(tmp_path / "f")


# ======================================================================== dtype / device
def test_dtype_and_device_placement(tmp_path):
    w = sf.write_saelens(tmp_path / "sae", "standard", D_IN, D_SAE)
    for dt, want in ((torch.float16, torch.float16), ("bfloat16", torch.bfloat16), ("torch.float64", F64)):
        sae = load_sae(tmp_path / "sae", dtype=dt, device="cpu")
        assert sae.dtype == want and sae.device.type == "cpu"
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            t = getattr(sae, name)
            assert t.dtype == want
            assert torch.equal(t, w[name].to(torch.float32).to(want))
    with pytest.raises(InputError, match="dtype"):
        load_sae(tmp_path / "sae", dtype="int8")
    with pytest.raises(InputError, match="device"):
        load_sae(tmp_path / "sae", device="gpu0")


def test_dtype_overflow_is_reported(tmp_path):
    folder = tmp_path / "layer_1"
    w = sf.write_gemmascope_npz(folder, D_IN, D_SAE)
    a = {k: v.numpy().astype(np.float32) for k, v in w.items()}
    a["W_dec"][0, 0] = 1e6
    np.savez(folder / "params.npz", **a)
    with pytest.raises(SAEFormatError, match="W_dec.*overflows"):
        load_sae(folder, dtype=torch.float16)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    sae = load_sae(tmp_path / "run" / "layers.0", device="cuda", dtype=torch.bfloat16)
    assert sae.device.type == "cuda" and sae.W_dec.device.type == "cuda" and sae.dtype == torch.bfloat16


# ======================================================================== bad input
def _saelens(tmp_path):
    sf.write_saelens(tmp_path / "sae", "topk", D_IN, D_SAE)
    return tmp_path / "sae", tmp_path / "sae" / "sae_weights.safetensors"


def _rewrite_weights(path, **changes):
    t = load_file(str(path))
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(path))


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(SAEFormatError, match="no such file or directory") as e:
        load_sae(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    folder, _ = _saelens(tmp_path)
    with pytest.raises(InputError, match="unknown format"):
        load_sae(folder, format="pickle")


def test_nothing_matches_lists_files_found(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "model.bin" in msg and "notes.txt" in msg and "sae_weights.safetensors" in msg
    with pytest.raises(SAEFormatError, match="cannot tell the SAE format"):
        load_sae(tmp_path / "model.bin")


def test_parent_of_hookpoint_directories_points_at_them(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    sf.write_sparsify(tmp_path / "run", "layers.1", D_IN, D_SAE, k=4)
    with pytest.raises(SAEFormatError, match=r"layers\.0.*layers\.1"):
        load_sae(tmp_path / "run")


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_missing_file(tmp_path, missing):
    folder, _ = _saelens(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(SAEFormatError, match="missing file") as e:
        load_sae(folder, format="saelens")
    assert missing in str(e.value)
    if missing == "sae_weights.safetensors":  # detected from cfg.json alone
        with pytest.raises(SAEFormatError, match="sae_weights.safetensors: missing file"):
            load_sae(folder)


def test_missing_weights_detected_from_config(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    (tmp_path / "run" / "layers.0" / "sae.safetensors").unlink()
    with pytest.raises(SAEFormatError, match="sae.safetensors: missing file"):
        load_sae(tmp_path / "run" / "layers.0")
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "ae.pt").unlink()
    with pytest.raises(SAEFormatError, match="ae.pt: missing file"):
        load_sae(tmp_path / "t")


def test_missing_config_dictionary_learning(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "config.json").unlink()
    with pytest.raises(SAEFormatError, match="config.json.*missing file"):
        load_sae(tmp_path / "t")


def test_missing_tensor(tmp_path):
    folder, weights = _saelens(tmp_path)
    _rewrite_weights(weights, b_enc=None)
    with pytest.raises(SAEFormatError, match="missing tensor 'b_enc'") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    sf.write_saelens(tmp_path / "j", "jumprelu", D_IN, D_SAE)
    _rewrite_weights(tmp_path / "j" / "sae_weights.safetensors", threshold=None)
    with pytest.raises(SAEFormatError, match="threshold"):
        load_sae(tmp_path / "j")
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    _rewrite_weights(tmp_path / "run" / "layers.0" / "sae.safetensors", W_dec=None)
    with pytest.raises(SAEFormatError, match="sae.safetensors: missing tensor 'W_dec'"):
        load_sae(tmp_path / "run" / "layers.0")


def test_shapes_disagreeing_with_each_other(tmp_path):
    folder, weights = _saelens(tmp_path)
    _rewrite_weights(weights, W_dec=torch.randn(D_SAE, D_IN + 1))
    with pytest.raises(SAEFormatError, match=r"'W_dec' has shape \[48, 13\], expected \[48, 12\]") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoderTopK", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    sd["b_dec"] = torch.zeros(D_IN - 2)
    torch.save(sd, tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="ae.pt.*'b_dec' has shape"):
        load_sae(tmp_path / "t")


def test_shapes_disagreeing_with_config(tmp_path):
    folder, _ = _saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE * 2
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"d_sae=48 but cfg.json says d_sae=96"):
        load_sae(folder)
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4, cfg_overrides={"d_in": D_IN + 4})
    with pytest.raises(SAEFormatError, match=r"d_in=12 but cfg.json says d_in=16"):
        load_sae(tmp_path / "run" / "layers.0")
    sf.write_sparsify(tmp_path / "run", "layers.1", D_IN, D_SAE, k=4, cfg_overrides={"num_latents": 40})
    with pytest.raises(SAEFormatError, match=r"d_sae=48 but cfg.json says d_sae=40"):
        load_sae(tmp_path / "run" / "layers.1")
    sf.write_dictionary_learning(tmp_path / "t", "JumpReluAutoEncoder", D_IN, D_SAE)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["trainer"]["dict_size"] = 7
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="ae.pt: weights have d_sae=48 but config.json says d_sae=7"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "made_up"])  # gated loads (test_interop_loaders)
def test_unknown_architecture(tmp_path, arch):
    folder, _ = _saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = arch
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=f"unsupported SAE architecture '{arch}'") as e:
        load_sae(folder)
    assert "cfg.json" in str(e.value)


def test_truncated_safetensors(tmp_path):
    folder, weights = _saelens(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="truncated") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    weights.write_bytes(data[:5])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_sae(folder)


def test_corrupt_safetensors(tmp_path):
    folder, weights = _saelens(tmp_path)
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12  # garbage in the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEFormatError, match="corrupt") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    weights.write_bytes(b"\xff" * 64)  # header length field far beyond the file
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_sae(folder)


def test_truncated_npz_and_pt(tmp_path):
    sf.write_gemmascope_npz(tmp_path / "g", D_IN, D_SAE)
    p = tmp_path / "g" / "params.npz"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(SAEFormatError, match="params.npz: truncated or corrupt"):
        load_sae(tmp_path / "g")
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    p = tmp_path / "t" / "ae.pt"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(SAEFormatError, match="ae.pt: truncated or corrupt"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    folder, weights = _saelens(tmp_path)
    W = load_file(str(weights))["W_enc"].clone()
    W[3, 5] = bad
    _rewrite_weights(weights, W_enc=W)
    with pytest.raises(SAEFormatError, match="'W_enc' has non-finite values") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    folder = tmp_path / "layer_0"
    a = {k: v.numpy().astype(np.float32) for k, v in sf.write_gemmascope_npz(folder, D_IN, D_SAE).items()}
    a["threshold"][2] = bad
    np.savez(folder / "params.npz", **a)
    with pytest.raises(SAEFormatError, match="params.npz: tensor 'threshold' has non-finite"):
        load_sae(folder)


def test_unreadable_json(tmp_path):
    folder, _ = _saelens(tmp_path)
    (folder / "cfg.json").write_text('{"d_in": 12, "architecture": ')
    with pytest.raises(SAEFormatError, match="cfg.json: unreadable JSON"):
        load_sae(folder)
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "config.json").write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match="config.json: expected a JSON object"):
        load_sae(tmp_path / "t")


class _Payload:
    """Unpickling this runs a side effect; weights_only loading must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pt_with_arbitrary_objects_is_refused(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    marker = tmp_path / "unpickled"
    sd["payload"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="ae.pt: refused to unpickle.*weights_only=True"):
        load_sae(tmp_path / "t")
    assert not marker.exists()


def test_pt_training_backup_is_explained(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    torch.save({"step": 10, "ae": sd, "optimizer": {"state": {}}, "config": {}, "norm_factor": None},
               tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="training backup"):
        load_sae(tmp_path / "t")


def test_errors_are_value_errors():
    # SAEFormatError is part of the public API and catchable as ValueError
    assert issubclass(gradsae.SAEFormatError, ValueError)


def test_saved_files_get_normal_permissions(tmp_path):
    """Atomic writes go through temporary files, which default to owner-only; the saved
    directory and files must have the modes a normal mkdir/open gives under the umask."""
    import os
    import stat

    from oracle import random_sae

    import gradsae

    old = os.umask(0o022)
    try:
        sae = random_sae(8, 16, "topk", k=2)
        sae.save(tmp_path / "new")
        modes_first = {f: stat.S_IMODE((tmp_path / "new" / f).stat().st_mode)
                       for f in ("cfg.json", "sae_weights.safetensors")}
        sae.save(tmp_path / "new")  # into the existing directory: per-file replacement
        stats = gradsae.LatentStats(16)
        stats.save(tmp_path / "stats.safetensors")
    finally:
        os.umask(old)
    assert modes_first == {"cfg.json": 0o644, "sae_weights.safetensors": 0o644}
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    for f in ["new/cfg.json", "new/sae_weights.safetensors", "stats.safetensors"]:
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f
