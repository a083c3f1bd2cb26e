"""Greedy generation with the KV cache on the spliced model, and scoring at the trigger step
(compared with the dense paper recipe on the full prefix at that step)."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import InputError
from gradsae.model import GradSAE


def parts(arch):
    m = tm.model(arch, scale=3.0).double()
    sae = random_sae(32, 64, "topk", k=6, dtype=torch.float64)
    tok = tm.tokenizer()
    return m, sae, tok, GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)


def no_cache_greedy(m, sae, ids, n):
    hook = tm.DenseSplice(tm.layer_module(m, 0), sae)
    try:
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, m(ids[None]).logits[0, -1].argmax()[None]])
    finally:
        hook.remove()
    return ids


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_cached_generation_equals_full_prefix_generation(arch):
    m, sae, tok, sc = parts(arch)
    prompt = tok("what king was in the north", return_tensors="pt")["input_ids"][0]
    g = sc.generate(prompt, max_new_tokens=8, stop_ids=[])
    assert len(g.token_ids) == 8
    assert torch.equal(torch.cat([prompt, g.token_ids]), no_cache_greedy(m, sae, prompt, 8))
    assert g.text == tok.decode(g.token_ids.tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_scores_at_trigger_are_the_recipe_on_the_prefix(arch):
    m, sae, tok, sc = parts(arch)
    prompt = tok("the question is what river", return_tensors="pt")["input_ids"][0]
    free = sc.generate(prompt, max_new_tokens=6, stop_ids=[]).token_ids
    target = int(free[3])
    step = int(torch.nonzero(free == target)[0])  # its first occurrence
    g = sc.score_at_trigger(prompt, trigger=lambda t: t == target, max_new_tokens=6, stop_ids=[])
    assert g.trigger_step == step and len(g.token_ids) == step
    prefix = torch.cat([prompt, free[:step]])
    ref, z, _y = tm.paper_scores(m, sae, 0, prefix)
    err = (g.scores.scores - ref).abs().max()
    assert err <= 1e-9 * ref.abs().max()
    # Y is the probability of exactly the trigger token
    with sc.spliced(), torch.no_grad():
        p = m(prefix[None]).logits[0, -1].softmax(-1)
    assert int(p.argmax()) == target and abs(g.scores.objective - float(p[target])) < 1e-12
    assert g.scores.active_last.tolist() == torch.nonzero(z[-1]).flatten().tolist()


def test_text_trigger_is_a_substring_of_the_predicted_token():
    _m, _sae, tok, sc = parts("llama")
    prompt = tok("the question is what river", return_tensors="pt")["input_ids"][0]
    free = sc.generate(prompt, max_new_tokens=8, stop_ids=[]).token_ids
    text = tok.decode([int(free[-1])])[:2]
    step = next(i for i, t in enumerate(free.tolist()) if text in tok.decode([t]))
    g = sc.score_at_trigger(prompt, trigger=text, max_new_tokens=8, stop_ids=[])
    assert g.trigger_step == step
    # generation that continues past the trigger keeps the scores of the first one
    full = sc.generate(prompt, max_new_tokens=8, trigger=text, stop_ids=[])
    assert torch.equal(full.token_ids, free) and full.trigger_step == step
    assert torch.allclose(full.scores.scores, g.scores.scores, rtol=0, atol=0)


def test_no_trigger_is_a_clear_error():
    _, _, _tok, sc = parts("gpt2")
    with pytest.raises(InputError, match="never predicted a token matching"):
        sc.score_at_trigger("the king of", trigger=lambda t: False, max_new_tokens=3)
    with pytest.raises(InputError, match="one prompt"):
        sc.generate(["the king", "a queen"])


def test_no_trigger_says_why_generation_ended():
    """Used up max_new_tokens, or stopped early at an end-of-sequence token: the error says
    which, with the counts."""
    _, _, tok, sc = parts("llama")
    prompt = "what king was in the north"
    free = sc.generate(prompt, max_new_tokens=6, stop_ids=[])
    assert free.stop_reason == "length" and len(free.token_ids) == 6
    with pytest.raises(InputError, match=r"never predicted a token matching the trigger .* in max_new_tokens=6 "
                                         r"generated tokens; raise max_new_tokens"):
        sc.score_at_trigger(prompt, trigger=lambda t: False, max_new_tokens=6, stop_ids=[])
    ids = free.token_ids.tolist()
    n = next(i for i in range(1, 6) if ids[i] not in ids[:i]) + 1  # a token first generated at step n
    eos = ids[n - 1]
    g = sc.generate(prompt, max_new_tokens=6, stop_ids=[eos])
    assert g.stop_reason == "stop_token" and g.token_ids.tolist() == ids[:n]
    with pytest.raises(InputError) as e:
        sc.score_at_trigger(prompt, trigger=lambda t: False, max_new_tokens=6, stop_ids=[eos])
    assert (f"generation stopped early at the end-of-sequence token {tok.decode([eos])!r} (id {eos}) after {n} "
            "generated tokens, out of max_new_tokens=6") in str(e.value)
    hit = sc.generate(prompt, max_new_tokens=6, stop_ids=[], trigger=lambda t: t == ids[1], stop_at_trigger=True)
    assert hit.stop_reason == "trigger" and hit.trigger_step == ids.index(ids[1])


def test_step_by_step_loop_for_models_without_generate():
    m, sae, tok, sc = parts("llama")

    class Plain(torch.nn.Module):  # the call convention only: no generate(), no config
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    plain = GradSAE(Plain(m), sae, hook="inner.model.layers.0", tokenizer=tok)
    prompt = tok("what king was in the north", return_tensors="pt")["input_ids"][0]
    for use_cache in (True, False):
        g = plain.generate(prompt, max_new_tokens=6, stop_ids=[], use_cache=use_cache)
        assert torch.equal(torch.cat([prompt, g.token_ids]), no_cache_greedy(m, sae, prompt, 6))
    free = sc.generate(prompt, max_new_tokens=6, stop_ids=[]).token_ids
    target = int(free[2])
    a = plain.score_at_trigger(prompt, trigger=lambda t: t == target, max_new_tokens=6, stop_ids=[])
    b = sc.score_at_trigger(prompt, trigger=lambda t: t == target, max_new_tokens=6, stop_ids=[])
    assert a.trigger_step == b.trigger_step and torch.allclose(a.scores.scores, b.scores.scores, atol=1e-12)
