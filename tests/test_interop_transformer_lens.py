"""GradSAE on TransformerLens HookedTransformers.

- The same tiny GPT-2 as a transformers model and as a HookedTransformer (weights converted by
  TransformerLens' own converter) gives the same GradSAE scores at the same hook names, with
  left and right padding.
- GradSAE with a live SAELens SAE on a HookedSAETransformer equals the paper's recipe written
  with SAELens' own objects (``add_sae`` + ``retain_grad`` on ``hook_sae_acts_post``), in
  splice mode and in error-term mode.
"""

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens", reason="transformer-lens is not installed (pip install -e '.[compat]')")

import tiny_models as tm  # noqa: E402
from oracle import random_sae  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402

import gradsae  # noqa: E402
from gradsae.errors import InputError  # noqa: E402

D, LAYERS = 32, 2


def hooked_twin(hf, cls=HookedTransformer):
    """The HookedTransformer (or subclass ``cls``) computing exactly what GPT-2 ``hf`` does."""
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        default_prepend_bos=False, dtype=hf.dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = cls(cfg)
        ht.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return ht.eval()


@pytest.fixture(scope="module")
def models():
    hf = tm.model("gpt2", d=D, layers=LAYERS, scale=3.0, seed=int(torch.randint(0, 10**6, ()))).double()
    return hf, hooked_twin(hf)


def rand_ids(B, T):
    return torch.randint(len(tm.SPECIAL), tm.VOCAB, (B, T))


def test_hooked_twin_is_the_same_model(models):
    hf, ht = models
    ids = rand_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ht(ids), hf(ids).logits, atol=1e-10, rtol=0)


def padded_mask(ids, padding):
    """Attention mask with some padding on one row: left (row 1) or right (row 2)."""
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[2, 5:] = 0
    return mask


def assert_same_scores(hf, other, sae, ids, mask, atol_rel, rtol, **kw):
    """GradSAE on the transformers model and on its TransformerLens twin give the same
    per-prompt scores (tolerance relative to the largest score of the batch)."""
    a = gradsae.GradSAE(hf, sae, **kw).score(ids, attention_mask=mask)
    b = gradsae.GradSAE(other, sae, **kw).score(ids, attention_mask=mask)
    assert len(a) == len(b) == ids.shape[0]
    # one prompt's relu scores may all be 0 with random weights; the batch's may not
    scale = max(float(ra.scores.abs().max()) for ra in a)
    assert scale > 0
    for ra, rb in zip(a, b):
        torch.testing.assert_close(rb.scores, ra.scores, atol=atol_rel * scale, rtol=rtol)
    return a, b


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
                                  "blocks.1.hook_attn_out", "blocks.1.attn.hook_z"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("mode", ["splice", "error"])
def test_hooked_transformer_scores_equal_hf_scores(models, hook, padding, mode):
    hf, ht = models
    ids = rand_ids(3, 8)
    mask = padded_mask(ids, padding)
    sae = random_sae(D, 96, "topk", k=6, dtype=torch.float64)
    a, b = assert_same_scores(hf, ht, sae, ids, mask, 1e-12, 1e-8, hook=hook, mode=mode)
    for ra, rb in zip(a, b):
        assert ra.objective == pytest.approx(rb.objective, rel=1e-10)
        assert torch.equal(ra.active_last, rb.active_last)


def neox_twin(hf):
    """The rotary HookedTransformer computing what GPT-NeoX ``hf`` does (TransformerLens'
    own converter)."""
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rotary = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, parallel_attn_mlp=c.use_parallel_residual, positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=round(rotary * d_head), normalization_type="LN",
        default_prepend_bos=False, dtype=hf.dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = HookedTransformer(cfg)
        ht.load_and_process_state_dict(convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return ht.eval()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rotary_hooked_transformer_scores_equal_hf(padding):
    """Rotary positions of padded rows: TransformerLens counts them from the attention mask,
    gradsae passes position ids counted the same way to the transformers model (float32: the
    HF GPT-NeoX gives NaN for left-padded rows in float64)."""
    hf = tm.model("gpt_neox", d=D, layers=LAYERS, scale=3.0, seed=int(torch.randint(0, 10**6, ())))
    ht = neox_twin(hf)
    ids = rand_ids(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ht(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    mask = padded_mask(ids, padding)
    sae = random_sae(D, 96, "topk", k=6)
    assert_same_scores(hf, ht, sae, ids, mask, 1e-4, 1e-3, hook="blocks.1.hook_resid_post")


def test_hooked_transformer_loss_attribution_equals_hf(models):
    hf, ht = models
    ids = rand_ids(2, 7)
    sae = random_sae(D, 64, "jumprelu", dtype=torch.float64)
    a = gradsae.GradSAE(hf, sae, hook="blocks.0.hook_resid_post").attribute(ids, objective="loss")
    b = gradsae.GradSAE(ht, sae, hook="blocks.0.hook_resid_post").attribute(ids, objective="loss")
    torch.testing.assert_close(b.influence.to_dense(), a.influence.to_dense(), atol=1e-12, rtol=1e-8)
    torch.testing.assert_close(b.objective, a.objective, atol=1e-12, rtol=0)


def test_unknown_hook_on_hooked_transformer_is_refused(models):
    _, ht = models
    sae = random_sae(D, 64, "topk", k=4, dtype=torch.float64)
    with pytest.raises(InputError, match="blocks.7.hook_resid_post"):
        gradsae.GradSAE(ht, sae, hook="blocks.7.hook_resid_post")


# ------------------------------------------------------------------ SAELens on HookedSAETransformer
def saelens_recipe(model, sl_sae, ids, use_error_term):
    """The paper's GradSAE written with SAELens' own objects: the SAE added to the
    HookedSAETransformer, its latents kept with retain_grad, Y = softmax probability of the
    argmax next token at the last position, scores = mean over positions of relu(z * dY/dz)."""
    model.add_sae(sl_sae, use_error_term=use_error_term)
    kept = {}

    def keep(acts, hook):
        acts.retain_grad()
        kept["z"] = acts
        return acts

    try:
        name = sl_sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
        logits = model.run_with_hooks(ids, fwd_hooks=[(name, keep)])
        y = logits[:, -1].softmax(-1).max(-1).values
        y.sum().backward()
    finally:
        model.reset_saes()
    z = kept["z"]
    return (z * z.grad).relu().mean(dim=1).detach(), y.detach()


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated"])
@pytest.mark.parametrize("use_error_term", [False, True], ids=["splice", "error"])
def test_gradsae_equals_paper_recipe_with_saelens_objects(models, arch, use_error_term):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    from sae_lens.saes.sae import SAEMetadata

    hf, _ = models
    model = hooked_twin(hf, sae_lens.HookedSAETransformer)
    hook = "blocks.1.hook_resid_post"
    cfg_cls = {"topk": sae_lens.TopKSAEConfig, "jumprelu": sae_lens.JumpReLUSAEConfig, "gated": sae_lens.GatedSAEConfig}
    cls = {"topk": sae_lens.TopKSAE, "jumprelu": sae_lens.JumpReLUSAE, "gated": sae_lens.GatedSAE}
    kw = {"k": 8, "rescale_acts_by_decoder_norm": True} if arch == "topk" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl_sae = cls[arch](cfg_cls[arch](d_in=D, d_sae=128, dtype="float64", normalize_activations="layer_norm",
                                         metadata=SAEMetadata(hook_name=hook), **kw))
    with torch.no_grad():
        for name, p in sl_sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name == "r_mag" else 1.0) / (D ** 0.5 if name == "W_enc" else 1))
        if arch == "jumprelu":
            sl_sae.threshold.copy_(torch.rand_like(sl_sae.threshold) * 0.5)
    ids = rand_ids(2, 8)
    want, y = saelens_recipe(model, sl_sae, ids, use_error_term)
    assert float(want.max()) > 0

    # gradsae takes the SAELens SAE and the HookedSAETransformer as they are; hook from the SAE
    scorer = gradsae.GradSAE(model, sl_sae, mode="error" if use_error_term else "splice")
    got = scorer.score(ids, objective="predicted_prob")
    for b in range(2):
        assert got[b].objective == pytest.approx(float(y[b]), rel=1e-10)
        torch.testing.assert_close(got[b].scores, want[b], atol=1e-12 * float(want.abs().max()), rtol=1e-8)


def test_hook_with_an_saelens_sae_attached_is_refused(models):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[compat]')")
    from sae_lens.saes.sae import SAEMetadata

    hf, _ = models
    model = hooked_twin(hf, sae_lens.HookedSAETransformer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sl_sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
            d_in=D, d_sae=64, dtype="float64", metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    model.add_sae(sl_sae)
    with pytest.raises(InputError, match="reset_saes"):
        gradsae.GradSAE(model, sl_sae)
    model.reset_saes()
    assert gradsae.GradSAE(model, sl_sae).score(rand_ids(1, 5))[0].objective > 0


def test_score_corpus_on_hooked_transformer_equals_hf(models):
    hf, ht = models
    sae = random_sae(D, 64, "topk", k=4, dtype=torch.float64)
    docs = ["the king of the north is here", "what river is blue ? the red one", "one two three four five six"]
    kw = dict(hook="blocks.1.hook_resid_post", tokenizer=tm.tokenizer(), progress=False, max_length=16)
    a, b = gradsae.score_corpus(hf, sae, docs, **kw).stats, gradsae.score_corpus(ht, sae, docs, **kw).stats
    assert float(a.relu_sum.abs().max()) > 0
    torch.testing.assert_close(b.count, a.count, atol=0, rtol=0)
    for name in ("score_sum", "relu_sum", "abs_sum", "act_sum"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-12, rtol=1e-8)


def test_spliced_generation_on_hooked_transformer_equals_hf(models):
    hf, ht = models
    sae = random_sae(D, 64, "topk", k=4, dtype=torch.float64)
    tok = tm.tokenizer()
    prompt = "the king of the north"
    a = gradsae.GradSAE(hf, sae, hook="blocks.1.hook_resid_post", tokenizer=tok).generate(prompt, max_new_tokens=6)
    b = gradsae.GradSAE(ht, sae, hook="blocks.1.hook_resid_post", tokenizer=tok).generate(prompt, max_new_tokens=6)
    assert len(a.token_ids) > 0
    assert a.token_ids.tolist() == b.token_ids.tolist() and a.text == b.text


@pytest.mark.parametrize("padding", ["left", "right"])
def test_transformer_bridge_scores_equal_hf(tmp_path, monkeypatch, padding):
    """TransformerLens 3's TransformerBridge (booted offline from a local tiny GPT-2) is taken
    like a HookedTransformer and gives the transformers model's scores."""
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge", reason="this transformer-lens has no TransformerBridge")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tm.model("gpt2", d=D, layers=LAYERS, scale=3.0, seed=int(torch.randint(0, 10**6, ())))
    hf.save_pretrained(tmp_path / "m")
    tm.tokenizer().save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_mod.TransformerBridge.boot_transformers(str(tmp_path / "m"), device="cpu")
    ids = rand_ids(3, 8)
    mask = padded_mask(ids, padding)
    sae = random_sae(D, 96, "topk", k=6)
    assert_same_scores(hf, bridge, sae, ids, mask, 1e-4, 1e-3, hook="blocks.1.hook_resid_post")
