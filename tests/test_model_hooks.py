"""Hook names resolve to the right tensors on every supported architecture."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import InputError
from gradsae.model import GradSAE, resolve_hook, valid_names
from gradsae.model.hooks import attach_replacement


def capture(m, name, ids):
    point = resolve_hook(m, name)
    got = []
    h = point.attach(lambda t: (got.append(t.detach().clone()), t)[1])
    try:
        with torch.no_grad():
            m(ids)
    finally:
        h.remove()
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_tl_names_are_the_residual_stream_and_its_parts(arch):
    m = tm.model(arch, scale=2.0)
    ids = torch.randint(4, tm.VOCAB, (2, 7))
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    for L in range(2):
        pre = capture(m, f"blocks.{L}.hook_resid_pre", ids)
        post = capture(m, f"blocks.{L}.hook_resid_post", ids)
        attn = capture(m, f"blocks.{L}.hook_attn_out", ids)
        mlp = capture(m, f"blocks.{L}.hook_mlp_out", ids)
        assert torch.allclose(pre, hs[L], atol=1e-6)
        if L == 0:  # the last hidden state HF reports has the final norm applied
            assert torch.allclose(post, hs[1], atol=1e-6)
        # resid_post = resid_pre + attn_out + mlp_out, in every architecture
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5), arch
        assert attn.abs().max() > 0 and mlp.abs().max() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_module_paths_and_sparsify_names(arch):
    m = tm.model(arch)
    ids = torch.randint(4, tm.VOCAB, (1, 5))
    ref = capture(m, "blocks.1.hook_resid_post", ids)
    layers = {"gpt2": "transformer.h", "llama": "model.layers", "gpt_neox": "gpt_neox.layers"}[arch]
    rel = layers.split(".", 1)[1] if "." in layers else layers
    assert torch.equal(capture(m, f"{layers}.1", ids), ref)
    assert torch.equal(capture(m, f"{rel}.1", ids), ref)  # sparsify: relative to the base model
    assert resolve_hook(m, f"{rel}.1").module is resolve_hook(m, "blocks.1.hook_resid_post").module


def test_hookpoint_modules_named_like_transformerlens_resolve():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hook_resid_post = torch.nn.Identity()

        def forward(self, x):
            return self.hook_resid_post(x * 2)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    toy = Toy()
    p = resolve_hook(toy, "blocks.1.hook_resid_post")
    assert p.module is toy.blocks[1].hook_resid_post and p.kind == "output"
    h = p.attach(lambda t: t + 1)
    assert torch.equal(toy(torch.ones(3)), torch.full((3,), 5.0))
    h.remove()
    assert torch.equal(toy(torch.ones(3)), torch.full((3,), 4.0))


def test_attach_replacement_on_tuple_outputs_and_inputs():
    class Tup(torch.nn.Module):
        def forward(self, x, y=None):
            return (x * 3, "extra")

    t = Tup()
    h = attach_replacement(t, lambda a: a + 1, "output")
    assert t(torch.zeros(2))[0].tolist() == [1.0, 1.0] and t(torch.zeros(2))[1] == "extra"
    h.remove()
    h = attach_replacement(t, lambda a: a + 1, "input")
    assert t(torch.zeros(2))[0].tolist() == [3.0, 3.0]
    h.remove()

    class Kw(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 3

    k = Kw()
    h = attach_replacement(k, lambda a: a + 1, "input")
    assert k(hidden_states=torch.zeros(2)).tolist() == [3.0, 3.0]
    h.remove()


def test_unknown_names_list_the_valid_ones():
    m = tm.model("llama")
    with pytest.raises(InputError) as e:
        resolve_hook(m, "blocks.0.hook_resid_mid")
    msg = str(e.value)
    assert "blocks.0.hook_resid_mid" in msg
    for n in valid_names(m):
        assert n in msg
    with pytest.raises(InputError, match="layer 5 does not exist"):
        resolve_hook(m, "blocks.5.hook_resid_post")
    with pytest.raises(InputError, match="unknown hook"):
        resolve_hook(m, "model.layers.9")
    assert len(valid_names(m)) == 16  # 2 layers x 8 kinds (attn.hook_z and the MLP inputs included)


def test_hook_from_sae_metadata_and_width_checks():
    m = tm.model("gpt2")
    sae = random_sae(32, 64, "topk", k=4)
    sae.meta.hook_name = "blocks.1.hook_mlp_out"
    sc = GradSAE(m, sae)
    assert sc.point.module is m.transformer.h[1].mlp
    bare = random_sae(32, 64, "topk", k=4)
    with pytest.raises(InputError, match="names no hook"):
        GradSAE(m, bare)
    wide = random_sae(48, 64, "topk", k=4)
    with pytest.raises(InputError, match="d_in=48"):
        GradSAE(m, wide, hook="blocks.0.hook_resid_post")
    # a module path of another width is only known at run time
    sc = GradSAE(m, wide, hook="transformer.h.0.mlp.c_fc")
    with pytest.raises(InputError, match="does not match the width 128"):
        sc.score(torch.randint(4, tm.VOCAB, (6,)))
    assert not m.transformer.h[0].mlp.c_fc._forward_hooks


def test_import_gradsae_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, gradsae; gradsae.GradSAE; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
