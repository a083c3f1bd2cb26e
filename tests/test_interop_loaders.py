"""One checkpoint, two roads: a checkpoint written by a library's own save function, loaded
with ``gradsae.load_sae``, is the same SAE as the live object wrapped with
``SAE.from_object`` (the object that was saved, and the library's own reload of it)."""

import json
import os
import warnings

import pytest
import torch

import gradsae
from interop_helpers import assert_encode_decode_equal, assert_same_sae, randomize

D_IN, D_SAE = 16, 48


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ------------------------------------------------------------------------------------- SAELens
SAELENS_CASES = [("standard", {}), ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
                 ("jumprelu", {})]


@pytest.mark.parametrize("arch,kw", SAELENS_CASES, ids=["standard", "topk", "topk-rescale", "jumprelu"])
@pytest.mark.parametrize("norm", ["none", "layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec_in", "no_b_dec_in"])
def test_saelens_save_model_loads_as_from_object(tmp_path, arch, kw, norm, apply_b_dec):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    from sae_lens.saes.sae import SAEMetadata

    cls = {"standard": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE, "jumprelu": sae_lens.JumpReLUSAE}[arch]
    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig}[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float64", normalize_activations=norm, apply_b_dec_to_input=apply_b_dec,
                  metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="tiny", hook_layer=3), **kw)
    lib = randomize(quiet(cls, cfg))
    if arch == "jumprelu":
        with torch.no_grad():
            lib.threshold.copy_(torch.rand_like(lib.threshold) * 2 - 0.5)
    lib.save_model(tmp_path / "ckpt")

    loaded = gradsae.load_sae(tmp_path / "ckpt")
    wrapped = gradsae.SAE.from_object(lib)
    reloaded = gradsae.SAE.from_object(quiet(sae_lens.SAE.load_from_disk, tmp_path / "ckpt"))
    assert_same_sae(loaded, wrapped)
    assert_same_sae(loaded, reloaded)
    assert (loaded.hook_name, loaded.meta.model_name, loaded.meta.hook_layer) == (
        wrapped.hook_name, wrapped.meta.model_name, wrapped.meta.hook_layer) == ("blocks.3.hook_resid_post", "tiny", 3)
    x = torch.randn(9, D_IN, dtype=torch.float64)
    assert_encode_decode_equal(loaded, lib.encode, lib.decode, x)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_saelens_gated_checkpoint_loads_as_from_object(tmp_path, norm):
    """Gated SAEs load in their exact JumpReLU form, through either road."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    lib = randomize(quiet(sae_lens.GatedSAE, sae_lens.GatedSAEConfig(
        d_in=D_IN, d_sae=D_SAE, dtype="float64", normalize_activations=norm)))
    lib.save_model(tmp_path / "g")
    loaded = gradsae.load_sae(tmp_path / "g")
    assert_same_sae(loaded, gradsae.SAE.from_object(lib))
    assert_same_sae(loaded, gradsae.SAE.from_object(quiet(sae_lens.SAE.load_from_disk, tmp_path / "g")))
    assert_encode_decode_equal(loaded, lib.encode, lib.decode, torch.randn(9, D_IN, dtype=torch.float64))


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_batchtopk_checkpoints_load_as_from_object(tmp_path, rescale):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", k=4.0,
                                              rescale_acts_by_decoder_norm=rescale)
    lib = randomize(quiet(sae_lens.BatchTopKTrainingSAE, cfg))
    lib.topk_threshold = torch.tensor(float(torch.rand(())) + 0.5, dtype=torch.double)
    wrapped = gradsae.SAE.from_object(lib)
    # the training checkpoint (architecture "batchtopk", scalar topk_threshold): the same SAE
    lib.save_model(tmp_path / "train")
    assert_same_sae(gradsae.load_sae(tmp_path / "train"), wrapped)
    # the inference checkpoint SAELens writes at the end of training (a JumpReLU SAE, decoder
    # norms folded in when rescaling): the same function
    lib.save_inference_model(tmp_path / "infer")
    x = torch.randn(9, D_IN, dtype=torch.float64)
    loaded = gradsae.load_sae(tmp_path / "infer")
    torch.testing.assert_close(loaded.encode(x), wrapped.encode(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(loaded(x), wrapped(x), atol=1e-10, rtol=0)


def test_saelens_hook_z_checkpoint_keeps_the_flag(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    from sae_lens.saes.sae import SAEMetadata

    lib = randomize(quiet(sae_lens.StandardSAE, sae_lens.StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, dtype="float64", reshape_activations="hook_z",
        metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z"))))
    lib.save_model(tmp_path / "z")
    loaded, wrapped = gradsae.load_sae(tmp_path / "z"), gradsae.SAE.from_object(lib)
    assert_same_sae(loaded, wrapped)
    assert loaded.meta.extra["reshape_activations"] == wrapped.meta.extra["reshape_activations"] == "hook_z"


# ------------------------------------------------------------------------------------ sparsify
@pytest.mark.parametrize("cfg", [dict(num_latents=D_SAE, k=5), dict(expansion_factor=3, k=4, normalize_decoder=False)],
                         ids=["num_latents", "expansion_factor"])
def test_sparsify_save_to_disk_loads_as_from_object(tmp_path, cfg):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")   # CPU tensors: sparsify's eager decoder
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[compat]')")
    lib = randomize(sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(**cfg), dtype=torch.float64))
    path = tmp_path / "layers.2"
    lib.save_to_disk(path)
    loaded = gradsae.load_sae(path)
    assert_same_sae(loaded, gradsae.SAE.from_object(lib))
    assert_same_sae(loaded, gradsae.SAE.from_object(sparsify.SparseCoder.load_from_disk(path, device="cpu")))
    assert loaded.hook_name == "layers.2"


# -------------------------------------------------------------------------- dictionary_learning
DL_CASES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
            "BatchTopKSAE", "MatryoshkaBatchTopKSAE"]


@pytest.mark.parametrize("dict_class", DL_CASES)
def test_dictionary_learning_checkpoint_loads_as_its_own_loader_gives(tmp_path, dict_class):
    pytest.importorskip(
        "dictionary_learning",
        reason="dictionary-learning is not installed (left out of the compat extra: its nnsight pin pulls a "
        "torchvision build that breaks transformers on CPU torch)")
    from dictionary_learning import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.dictionary import AutoEncoderNew
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.utils import load_dictionary

    k = 5
    ae = {
        "AutoEncoder": lambda: AutoEncoder(D_IN, D_SAE), "AutoEncoderNew": lambda: AutoEncoderNew(D_IN, D_SAE),
        "GatedAutoEncoder": lambda: GatedAutoEncoder(D_IN, D_SAE),
        "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(D_IN, D_SAE),
        "AutoEncoderTopK": lambda: AutoEncoderTopK(D_IN, D_SAE, k), "BatchTopKSAE": lambda: BatchTopKSAE(D_IN, D_SAE, k),
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D_IN, D_SAE, k, [16, 32]),
    }[dict_class]()
    randomize(ae)
    with torch.no_grad():
        if dict_class == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand_like(ae.threshold))
        if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            ae.threshold.fill_(0.4)
    # what dictionary_learning's trainSAE writes: ae.pt (the state dict) and config.json
    out = tmp_path / "trainer_0"
    out.mkdir()
    torch.save({n: v.cpu() for n, v in ae.state_dict().items()}, out / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "k": k, "layer": 3,
               "lm_name": "tiny", "submodule_name": "resid_post_layer_3"}
    (out / "config.json").write_text(json.dumps({"trainer": trainer}))

    own, _ = load_dictionary(str(out), device="cpu")
    loaded = gradsae.load_sae(out)
    # AutoEncoder.from_pretrained normalises the decoder (in float32), so allow its rounding
    assert_same_sae(loaded, gradsae.SAE.from_object(own), atol=1e-6, rtol=1e-5)
    assert loaded.meta.model_name == "tiny" and loaded.meta.hook_layer == 3


def test_gated_dictionary_learning_checkpoint_without_the_library(tmp_path):
    """The gated ae.pt layout, written by hand, loads to the gated maths written out here
    (runs where dictionary_learning is absent)."""
    F, D = D_SAE, D_IN
    state = {"encoder.weight": torch.randn(F, D, dtype=torch.float64), "gate_bias": torch.randn(F, dtype=torch.float64),
             "r_mag": 0.3 * torch.randn(F, dtype=torch.float64), "mag_bias": torch.randn(F, dtype=torch.float64),
             "decoder.weight": torch.randn(D, F, dtype=torch.float64), "decoder_bias": torch.randn(D, dtype=torch.float64)}
    out = tmp_path / "trainer_0"
    out.mkdir()
    torch.save(state, out / "ae.pt")
    (out / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder", "activation_dim": D,
                                                             "dict_size": F, "layer": 1}}))
    sae = gradsae.load_sae(out)
    x = torch.randn(11, D, dtype=torch.float64)
    x_enc = (x - state["decoder_bias"]) @ state["encoder.weight"].T
    gate = x_enc + state["gate_bias"] > 0
    z = gate * torch.relu(state["r_mag"].exp() * x_enc + state["mag_bias"])
    assert 0 < int((z > 0).sum()) < z.numel()
    torch.testing.assert_close(sae.encode(x), z, atol=1e-10, rtol=0)
    torch.testing.assert_close(sae.decode(z), z @ state["decoder.weight"].T + state["decoder_bias"], atol=1e-10, rtol=0)
