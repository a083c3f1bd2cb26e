"""SAE.from_object on live SAELens SAEs: encode, decode and influence equal SAELens' own, for
every architecture gradsae expresses exactly, with input normalisation and
apply_b_dec_to_input; unsupported ones are refused by name."""

import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")

import gradsae  # noqa: E402
from gradsae.errors import InputError  # noqa: E402
from interop_helpers import (  # noqa: E402
    assert_encode_decode_equal,
    assert_influence_matches_library,
    randomize,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D_IN, D_SAE = 16, 64
NORMS = ("none", "layer_norm", "constant_norm_rescale")


def make(arch: str, *, norm="none", apply_b_dec=True, training=False, dtype="float64", **cfg_kw):
    """A SAELens SAE of ``arch`` with random weights (thresholds straddling 0)."""
    names = {
        "standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
    }
    base = names[arch]
    cls_name = base.replace("SAE", "TrainingSAE") if training else base
    cls = getattr(sae_lens, cls_name)
    cfg_cls = getattr(sae_lens, cls_name + "Config")
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=dtype, normalize_activations=norm,
                  apply_b_dec_to_input=apply_b_dec,
                  metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny"), **cfg_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = randomize(cls(cfg))
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 2 - 0.5)
    return sae


def x_of(dtype=torch.float64):
    return torch.randn(3, 5, D_IN, dtype=dtype) * 2 + 0.5


CASES = [("standard", {}), ("topk", {"k": 6}), ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
         ("jumprelu", {}), ("gated", {})]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}{'-rescale' if k.get('rescale_acts_by_decoder_norm') else ''}"
                                               for a, k in CASES])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec_in", "no_b_dec_in"])
def test_encode_decode_equal_saelens(arch, kw, norm, apply_b_dec):
    lib = make(arch, norm=norm, apply_b_dec=apply_b_dec, **kw)
    sae = gradsae.SAE.from_object(lib)
    x = x_of()
    assert_encode_decode_equal(sae, lib.encode, lib.decode, x)
    # the whole forward (encode + decode) too
    with torch.no_grad():
        torch.testing.assert_close(sae(x), lib(x), atol=1e-10, rtol=0)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.meta.model_name == "tiny"
    assert sae.meta.hook_layer == 1   # read from the hook name, as the loader does


@pytest.mark.parametrize("arch,kw", CASES[1:], ids=["topk", "topk-rescale", "jumprelu", "gated"])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_influence_equals_autograd_through_saelens_decode(arch, kw, norm):
    lib = make(arch, norm=norm, **kw)
    x = x_of()
    # gradsae.influence takes the live SAELens object directly
    assert_influence_matches_library(lib, lib.encode, lib.decode, x)


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("topk", {"k": 5}), ("jumprelu", {}), ("gated", {})])
def test_training_saes_encode_like_saelens(arch, kw):
    lib = make(arch, training=True, **kw)
    if arch == "jumprelu":
        with torch.no_grad():
            lib.threshold.copy_(torch.rand_like(lib.threshold))
    assert_encode_decode_equal(gradsae.SAE.from_object(lib), lib.encode, lib.decode, x_of())


def test_float32_saelens_matches_within_rounding():
    lib = make("topk", dtype="float32", k=6, rescale_acts_by_decoder_norm=True)
    sae = gradsae.SAE.from_object(lib)
    assert sae.dtype == torch.float32
    x = x_of(torch.float32)
    z, z_lib = sae.encode(x), lib.encode(x).detach()
    torch.testing.assert_close(z, z_lib, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(z), lib.decode(z_lib).detach(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("rescale", [False, True])
def test_batchtopk_training_sae_equals_its_saved_inference_form(arch, rescale, tmp_path):
    """SAELens saves BatchTopK SAEs as JumpReLU SAEs; the live training object wraps to that."""
    kw = dict(d_in=D_IN, d_sae=D_SAE, dtype="float64", k=4.0, rescale_acts_by_decoder_norm=rescale)
    if arch == "batchtopk":
        cls, cfg = sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig(**kw)
    else:
        cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[16, 48], **kw)
        cls = sae_lens.MatryoshkaBatchTopKTrainingSAE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = randomize(cls(cfg))
    lib.topk_threshold = torch.tensor(float(torch.rand(())) + 0.5, dtype=torch.double)
    sae = gradsae.SAE.from_object(lib)
    lib.save_inference_model(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(saved).__name__ == "JumpReLUSAE"
    x = x_of()
    assert_encode_decode_equal(sae, saved.encode, saved.decode, x)


def test_unsupported_saelens_architectures_are_refused_by_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        abstopk = sae_lens.AbsTopKSAE(sae_lens.AbsTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with pytest.raises(InputError, match="abstopk") as e:
        gradsae.SAE.from_object(abstopk)
    assert "AbsTopKSAE" in str(e.value) and "supported" in str(e.value)


def test_hook_z_sae_reads_the_heads_flattened():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = randomize(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
            d_in=D_IN, d_sae=D_SAE, dtype="float64", reshape_activations="hook_z",
            metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z"))))
    sae = gradsae.SAE.from_object(lib)
    assert sae.meta.extra["reshape_activations"] == "hook_z"
    x = torch.randn(2, 5, 4, D_IN // 4, dtype=torch.float64)   # [batch, pos, n_heads, d_head]
    z_lib = lib.encode(x).detach()
    z = sae.encode(x.flatten(-2))
    torch.testing.assert_close(z, z_lib, atol=1e-10, rtol=0)
    torch.testing.assert_close(sae.decode(z).unflatten(-1, (4, D_IN // 4)), lib.decode(z_lib).detach(),
                               atol=1e-10, rtol=0)


def test_not_an_sae_is_refused_with_the_supported_list():
    with pytest.raises(InputError, match="torch.nn.modules.linear.Linear") as e:
        gradsae.SAE.from_object(torch.nn.Linear(3, 4))
    assert "SAELens" in str(e.value) and "sparsify" in str(e.value) and "dictionary_learning" in str(e.value)
    plain = gradsae.SAE.from_object(make("standard"))
    assert gradsae.SAE.from_object(plain) is plain
