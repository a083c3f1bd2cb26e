"""Transcoders in a model: GradSAE's per-token influence of a transcoder equals a dense float64
autograd recipe written here by hand (the MLP's input read with a pre-hook, the MLP's output
replaced by the dense transcoder, z.retain_grad()), on GPT-2, Llama and Gemma-2 tiny configs, in
splice and error mode, with padding (and GPT-NeoX, Gemma-3); sparsify's and SAELens' transcoders in their own formats
score the same way."""

from __future__ import annotations

import os

import pytest
import tiny_models as tm
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import gradsae  # noqa: E402
from gradsae import InputError  # noqa: E402
from gradsae.model import GradSAE  # noqa: E402

F64 = torch.float64
D, D_SAE, LAYER = 32, 96, 1
TEXTS = ["the king of the north was red and the queen was blue", "what river is blue ?"]


def transcoder(kind: str, hook_in="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out"):
    g = lambda *s, scale=1.0: torch.randn(*s, dtype=F64) * scale  # noqa: E731
    kw = dict(apply_b_dec_to_input=False, transcoder=True, hook_name=hook_in, hook_name_out=hook_out)
    if kind == "topk":
        return gradsae.SAE(g(D, D_SAE, scale=0.3), g(D_SAE, scale=0.1), g(D_SAE, D, scale=0.3), g(D, scale=0.1),
                           "topk", k=6, **kw)
    return gradsae.SAE(g(D, D_SAE, scale=0.3), g(D_SAE, scale=0.1), g(D_SAE, D, scale=0.3), g(D, scale=0.1),
                       "jumprelu", threshold=torch.rand(D_SAE, dtype=F64) * 0.8, W_skip=g(D, D, scale=0.2), **kw)


def mlp_modules(m, layer):
    """(module whose input is the MLP's input, module whose output is hook_mlp_out), by hand."""
    lay = tm.layer_module(m, layer)
    if m.config.model_type in ("gemma2", "gemma3_text"):
        return lay.mlp, lay.post_feedforward_layernorm
    return lay.mlp, lay.mlp


def dense_encode(sae, x):
    pre = x @ sae.W_enc + sae.b_enc
    if sae.activation == "topk":
        t = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, t.indices, t.values.relu())
    if sae.activation == "relu":
        return pre.relu()
    return pre * (pre > sae.threshold.clamp(min=0))


def dense_recipe(m, sae, ids, mode):
    """One unpadded example: Y = mean next-token NLL; returns (z * dY/dz [T, d_sae], z, Y)."""
    mod_in, mod_out = mlp_modules(m, LAYER)
    seen, zs = [], []

    def pre(mod, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    def post(mod, args, out):
        y = out[0] if isinstance(out, tuple) else out
        x = seen.pop().detach()
        z = dense_encode(sae, x).requires_grad_(True)
        z.retain_grad()
        zs.append(z)
        tc = z @ sae.W_dec + sae.b_dec
        if sae.W_skip is not None:
            tc = tc + x @ sae.W_skip.T
        new = tc if mode == "splice" else tc + (y - tc).detach()
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    h1 = mod_in.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = mod_out.register_forward_hook(post)
    try:
        logits = m(ids.unsqueeze(0)).logits[0]
        y = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
        y.backward()
    finally:
        h1.remove()
        h2.remove()
    m.zero_grad(set_to_none=True)
    z = zs[0][0]
    return (zs[0].grad[0] * z).detach(), z.detach(), float(y.detach())


def check_against_recipe(m, sae, scorer, mode, tok):
    attr = scorer.attribute(TEXTS, objective="loss")
    dense_scores = attr.influence.to_dense("scores")
    dense_acts = attr.influence.to_dense("acts")
    for b, text in enumerate(TEXTS):
        ids = torch.tensor(tok(text)["input_ids"])
        n = len(ids)
        want, z, y = dense_recipe(m, sae, ids, mode)
        assert int((z != 0).sum()) > 0 and float(want.abs().max()) > 0
        torch.testing.assert_close(dense_acts[b, :n], z, atol=1e-10, rtol=0)
        torch.testing.assert_close(dense_scores[b, :n], want, atol=1e-10, rtol=1e-8)
        assert float(dense_scores[b, n:].abs().sum()) == 0.0  # padding
        assert abs(float(attr.objective[b]) - y) < 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gpt_neox", "gemma3_text"])
@pytest.mark.parametrize("mode", ["splice", "error"])
@pytest.mark.parametrize("kind", ["topk", "jumprelu_skip"])
def test_transcoder_matches_dense_recipe(arch, mode, kind):
    m = tm.model(arch, d=D, scale=2.0).double()
    tok = tm.tokenizer()
    sae = transcoder(kind)
    scorer = GradSAE(m, sae, mode=mode, tokenizer=tok)
    assert scorer.point.name == "blocks.1.ln2.hook_normalized" and scorer.splice.point.name == "blocks.1.hook_mlp_out"
    check_against_recipe(m, sae, scorer, mode, tok)


def test_error_mode_keeps_the_forward_and_splice_changes_it():
    m = tm.model("llama", d=D, scale=2.0).double()
    tok = tm.tokenizer()
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    base = m(ids).logits.detach()
    sae = transcoder("jumprelu_skip")
    with GradSAE(m, sae, mode="error").spliced():
        torch.testing.assert_close(m(ids).logits, base, atol=0, rtol=0)
    with GradSAE(m, sae, mode="splice").spliced():
        spliced = m(ids).logits
    assert float((spliced - base).detach().abs().max()) > 1e-3
    # zeroing every latent leaves b_dec + skip at the MLP output
    with GradSAE(m, sae, mode="splice").intervene(zero=range(D_SAE)):
        zeroed = m(ids).logits
    mod_in, mod_out = mlp_modules(m, LAYER)
    h = mod_out.register_forward_hook(lambda mod, a, out: sae.b_dec + a[0] @ sae.W_skip.T)
    try:
        torch.testing.assert_close(zeroed, m(ids).logits, atol=1e-10, rtol=0)
    finally:
        h.remove()


def test_hook_names_and_errors():
    m = tm.model("gemma2", d=D)
    from gradsae.model.hooks import resolve_hook, resolve_transcoder, valid_names

    lay = m.model.layers[1]
    p = resolve_hook(m, "blocks.1.ln2.hook_normalized")
    assert p.module is lay.mlp and p.kind == "input"
    assert resolve_hook(m, "blocks.1.mlp.hook_in").module is lay.mlp
    q = resolve_hook(m, "blocks.1.hook_mlp_in")
    assert q.module is lay.pre_feedforward_layernorm and q.kind == "input"
    pin, pout = resolve_transcoder(m, "blocks.1.ln2.hook_normalized")
    assert pout.module is lay.post_feedforward_layernorm and pout.kind == "output"
    assert "blocks.0.ln2.hook_normalized" in valid_names(m)
    g = tm.model("gpt2", d=D)
    assert resolve_hook(g, "blocks.0.hook_mlp_in").module is g.transformer.h[0].ln_2
    pin, pout = resolve_transcoder(m, "model.layers.1.mlp")  # a module: its input and output
    assert pin.module is pout.module is lay.mlp and (pin.kind, pout.kind) == ("input", "output")
    sae = transcoder("topk")
    with pytest.raises(InputError, match="d_in=32 does not match"):
        GradSAE(tm.model("llama", d=16), sae)


def test_sparsify_transcoder_on_its_module(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    from interop_helpers import randomize

    cfg = sparsify.SparseCoderConfig(num_latents=D_SAE, k=6, transcode=True, skip_connection=True)
    lib = randomize(sparsify.SparseCoder(D, cfg, dtype=F64))
    with torch.no_grad():
        lib.W_skip.mul_(0.2)
        lib.W_dec.mul_(0.3)
        lib.encoder.weight.mul_(0.3)
    lib.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    sae = gradsae.load_sae(tmp_path / "run" / "layers.1.mlp", dtype=F64)
    m = tm.model("llama", d=D, scale=2.0).double()
    tok = tm.tokenizer()
    for mode in ("splice", "error"):
        scorer = GradSAE(m, sae, mode=mode, tokenizer=tok)  # reads layers.1.mlp's input, replaces its output
        assert scorer.splice.point_in.kind == "input" and scorer.splice.point.kind == "output"
        check_against_recipe(m, sae, scorer, mode, tok)
    # the live object, given its hookpoint
    check_against_recipe(m, sae, GradSAE(m, lib, hook="layers.1.mlp", mode="splice", tokenizer=tok), "splice", tok)


def test_saelens_transcoder_object_scores():
    sae_lens = pytest.importorskip("sae_lens")
    import warnings

    from interop_helpers import randomize
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.SkipTranscoderConfig(d_in=D, d_sae=D_SAE, d_out=D, dtype="float64", apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name="blocks.1.ln2.hook_normalized"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = randomize(sae_lens.SkipTranscoder(cfg))
    with torch.no_grad():
        for p in lib.parameters():
            p.mul_(0.3)
    m = tm.model("gpt2", d=D, scale=2.0).double()
    tok = tm.tokenizer()
    sae = gradsae.SAE.from_object(lib)
    check_against_recipe(m, sae, GradSAE(m, lib, mode="splice", tokenizer=tok), "splice", tok)


def test_transformer_lens_hook_points():
    pytest.importorskip("transformer_lens")
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=tm.VOCAB,
                                  act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False,
                                  dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(int(torch.randint(0, 10**6, ())))
        ht = HookedTransformer(cfg).eval()
        with torch.no_grad():
            for p in ht.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
    ids = torch.randint(len(tm.SPECIAL), tm.VOCAB, (2, 9))
    for kind, mode in (("topk", "splice"), ("jumprelu_skip", "error")):
        sae = transcoder(kind)
        attr = GradSAE(ht, sae, mode=mode).attribute(ids, objective="loss")
        seen, zs = [], []

        def cap(x, hook):
            seen.append(x.detach())

        def rep(y, hook):
            x = seen.pop()
            z = dense_encode(sae, x).requires_grad_(True)
            z.retain_grad()
            zs.append(z)
            tc = z @ sae.W_dec + sae.b_dec
            if sae.W_skip is not None:
                tc = tc + x @ sae.W_skip.T
            return tc if mode == "splice" else tc + (y - tc).detach()

        logits = ht.run_with_hooks(ids, fwd_hooks=[("blocks.1.ln2.hook_normalized", cap),
                                                   ("blocks.1.hook_mlp_out", rep)])
        y = sum(torch.nn.functional.cross_entropy(logits[b, :-1], ids[b, 1:]) for b in range(2))
        y.backward()
        z = zs[0]
        torch.testing.assert_close(attr.influence.to_dense("acts"), z.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(attr.influence.to_dense("scores"), (z * z.grad).detach(), atol=1e-10, rtol=1e-8)
        assert float((z * z.grad).detach().abs().max()) > 0


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_corpus_statistics_of_a_transcoder(tmp_path, mode):
    m = tm.model("gemma2", d=D, scale=2.0).double()
    tok = tm.tokenizer()
    sae = transcoder("jumprelu_skip")
    docs = TEXTS + ["the stone in the west is dark", "how many did water win ?"]
    res = gradsae.score_corpus(m, sae, docs, objective="loss", mode=mode, tokenizer=tok, out=tmp_path / "run",
                               batch_tokens=24, top_n=2, context=2, progress=False)
    count = torch.zeros(D_SAE, dtype=torch.int64)
    score_sum = torch.zeros(D_SAE, dtype=F64)
    act_sum = torch.zeros(D_SAE, dtype=F64)
    for text in docs:
        s, z, _ = dense_recipe(m, sae, torch.tensor(tok(text)["input_ids"]), mode)
        count += (z != 0).sum(0)
        score_sum += s.sum(0)
        act_sum += z.sum(0)
    assert res.meta["hook"] == "blocks.1.ln2.hook_normalized"
    assert torch.equal(res.stats.count.cpu(), count)
    torch.testing.assert_close(res.stats.score_sum.cpu(), score_sum, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(res.stats.act_sum.cpu(), act_sum, atol=1e-9, rtol=1e-7)
