"""The released recipe (``recipe="released"``), knob by knob, against the released code's
semantics written out here independently of gradsae:

- the stored selection comes from the last step whose predicted token matches the trigger
  (a full-prefix greedy loop with a dense SAE hook that scores and overwrites at every match);
- Top-K is an argsort over all latents padded with zero-score latents, Bottom-K the non-zero
  scores ascending;
- examples are kept at F1 >= 0.9 on the answer extracted with special tokens kept;
- steering zeroes the own Top-K and sets the donor's Top-K to its scores clamped to [0, 50] at
  the last position, the donor drawn among the questions on the same paragraph with seed 42;
- with ``out_dtype`` the residual stream after the hook is in the SAE's dtype.
"""

import random
import re
import string
from collections import Counter

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae import experiments as ex
from gradsae.errors import InputError
from gradsae.model import GradSAE, PromptScores
from gradsae.recipes import DEFAULT, RELEASED, Recipe, get_recipe, select

EOS = 2


# ------------------------------------------------------------------------- the released semantics
def rel_normalize(s):
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def rel_f1(pred, golds):
    best = 0.0
    for g in golds:
        p, t = rel_normalize(pred).split(), rel_normalize(g).split()
        same = sum((Counter(p) & Counter(t)).values())
        if same:
            pr, rc = same / len(p), same / len(t)
            best = max(best, 2 * pr * rc / (pr + rc))
    return best


def rel_answer(text):
    text = text.replace("<end_of_turn>", "")
    m = re.search(r"\[\s*(.*?)\s*\]", text)
    if m:
        text = m.group(1)
    return text.replace("[", "").replace("]", "").replace("=", "").strip()


def rel_top(scores, n):
    """The released code's Top-K: ``torch.argsort(scores, descending=True)[:n]`` (an unstable
    sort: the order of tied zero scores is the sort's own)."""
    return torch.argsort(scores, descending=True)[:n].tolist()


def rel_bottom(scores, n):
    s = scores.tolist()
    return sorted((j for j in range(len(s)) if s[j] != 0), key=lambda j: (s[j], j))[:n]


def rel_generate(m, sae, ids, n, match=None, zero_all=(), zero_last=(), set_last=None):
    """Greedy decoding re-running the full prefix at every step, with the SAE spliced densely
    at layer 0 (edits applied to z before decoding). With ``match``, every step whose argmax
    token matches is scored (Y = its probability, relu(z.grad * z) averaged over positions)
    and overwrites the stored result. Returns (generated ids, stored scores or None, stored mean
    activation, number of latents active at the last position of the stored step)."""
    store = {}

    def hook(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        z = tm.dense_encode(sae, x.detach())
        z.requires_grad_(True)
        z.retain_grad()
        store["z"] = z
        z2 = z.clone()
        for j in zero_all:
            z2[:, :, j] = 0
        for j in zero_last:
            z2[:, -1, j] = 0
        for j, v in (set_last or {}).items():
            z2[:, -1, j] = v
        xh = tm.dense_decode(sae, z2)
        return (xh,) + tuple(out[1:]) if isinstance(out, tuple) else xh

    h = tm.layer_module(m, 0).register_forward_hook(hook)
    gen, stored = [], None
    try:
        for _ in range(n):
            full = torch.cat([ids, torch.tensor(gen, dtype=ids.dtype)])
            with torch.set_grad_enabled(match is not None):  # gradients only where a step is scored
                p = m(full[None]).logits[0, -1].softmax(-1)
            nxt = int(p.argmax())
            if match is not None and match(nxt):
                p[nxt].backward()
                z = store["z"]
                stored = ((z.grad * z).relu()[0].mean(0).detach(), z[0].mean(0).detach(),
                          int((z[0, -1] != 0).sum()))
            m.zero_grad(set_to_none=True)
            gen.append(nxt)
            if nxt == EOS:
                break
    finally:
        h.remove()
    return (gen,) + (stored if stored is not None else (None, None, None))


def rel_donors(kept_order, examples, prompt_of):
    """The released data preparation: prompts kept (in order) keyed by prompt; going through
    the dataset, each kept prompt draws one of the kept prompts containing its context."""
    data = {}
    for e in kept_order:
        data[prompt_of(e)] = e
    rng = random.Random(42)
    out = {}
    for e in examples:
        p = prompt_of(e)
        if p not in data:
            continue
        cand = [v for key, v in data.items() if e["context"] in key and p != key]
        if cand:
            out[p] = rng.choice(cand)
    return out


# ------------------------------------------------------------------------- knobs, unit level
def test_presets():
    assert get_recipe("default") is DEFAULT and get_recipe("released") is RELEASED
    assert get_recipe(RELEASED) is RELEASED
    assert (RELEASED.trigger_at, RELEASED.selection, RELEASED.keep, RELEASED.keep_f1, RELEASED.answer,
            RELEASED.donor, RELEASED.donor_seed, RELEASED.donor_values, RELEASED.clamp, RELEASED.splice_dtype,
            RELEASED.prompt_style) == ("last", "argsort", "f1", 0.9, "released", "same-context", 42, "score",
                                       (0.0, 50.0), "sae", "gemma-released")
    assert (DEFAULT.trigger_at, DEFAULT.selection, DEFAULT.keep, DEFAULT.donor, DEFAULT.donor_values,
            DEFAULT.clamp, DEFAULT.splice_dtype) == ("first", "active", "exact", "next", "last", None, "model")
    assert ex.template_for("released") == ex.PROMPT_GEMMA_RELEASED and ex.template_for("default") == ex.PROMPT
    with pytest.raises(InputError, match="unknown recipe"):
        get_recipe("paper")
    with pytest.raises(InputError, match="trigger_at"):
        Recipe("x", trigger_at="middle")
    with pytest.raises(InputError, match="clamp"):
        Recipe("x", clamp=(5.0, 1.0))
    with pytest.raises(Exception):
        RELEASED.keep = "exact"  # frozen


def prompt_scores(scores, active_last):
    d = scores.numel()
    act = scores != 0
    return PromptScores(scores, act, torch.tensor(sorted(active_last)), torch.zeros(d), torch.zeros(d), 0.0)


@pytest.mark.parametrize("n_pos", [0, 3, 40])
def test_argsort_selection_pads_with_zero_score_latents(n_pos):
    d = 64
    s = torch.zeros(d, dtype=torch.float64)
    pos = torch.randperm(d)[:n_pos]
    s[pos] = torch.rand(n_pos, dtype=torch.float64) + 1e-3
    ps = prompt_scores(s, torch.randperm(d)[:20].tolist())  # 20 active at the last position
    by_score = sorted(range(d), key=lambda j: (-float(s[j]), j))  # positive scores have no ties
    for K in (1, 5, 10, 0.5, 30):
        n = ps.resolve_k(K)
        top = select(ps, K, "top", "argsort")
        assert top == rel_top(s, n)
        assert len(top) == n == len(set(top))  # padded with zero-score latents
        assert top[:min(n, n_pos)] == by_score[:min(n, n_pos)]
        assert all(s[j] == 0 for j in top[n_pos:])
        assert select(ps, K, "bottom", "argsort") == rel_bottom(s, n)
        # the default rule: candidates only, never padded
        assert select(ps, K, "top", "active") == ps.top(K, False).tolist()
        assert select(ps, K, "bottom", "active") == ps.bottom(K, False).tolist()
    if n_pos < 10:  # where the released code pads, gradsae's strict Bottom-K raises
        with pytest.raises(InputError):
            ps.bottom(10)


def test_answer_extraction_and_f1_keep():
    cases = ["result = [[ north ]] <eos>", "north <eos>", "result = [ south ] and [[ x ]]",
             "a\n[[ two\n]]", "= [[ the king ]]<end_of_turn>", "no brackets"]
    for text in cases:
        assert ex.extract_answer_released(text.replace("<end_of_turn>", "")) == rel_answer(text)
    assert ex.extract_answer_released("north <eos>") == "north <eos>"
    golds = ["one two three four five six seven eight nine ten"]
    for pred in ("one two three four five six seven eight nine", "one two three four five six seven eight",
                 "one two three four five six seven eight nine ten", "north <eos>", "north"):
        assert ex.keeps(pred, golds, "released") == (rel_f1(pred, golds) >= 0.9)
        assert ex.keeps(pred, golds, "default") == (rel_normalize(pred) == rel_normalize(golds[0]))
    # kept at F1 >= 0.9 though not an exact match; an answer keeping <eos> is not kept on "north"
    assert ex.keeps("one two three four five six seven eight nine", golds, "released")
    assert not ex.keeps("one two three four five six seven eight nine", golds, "default")
    assert not ex.keeps("north <eos>", ["north"], "released") and ex.keeps("north", ["north"], "released")


def test_released_answer_keeps_special_tokens():
    from gradsae.model import Generation

    tok = tm.tokenizer()
    sc = type("S", (), {"tokenizer": tok})()
    for words in ("north <eos>", "result = [[ north ]] <eos>"):
        ids = torch.tensor(tok(words)["input_ids"])
        g = Generation(torch.tensor([1]), ids, tok.decode(ids.tolist(), skip_special_tokens=True))
        assert ex.generation_answer(sc, g, "released") == rel_answer(tok.decode(ids.tolist()))
        assert ex.generation_answer(sc, g, "default") == ex.extract_answer(g.text)
    ids = torch.tensor(tok("north <eos>")["input_ids"])
    g = Generation(torch.tensor([1]), ids, tok.decode(ids.tolist(), skip_special_tokens=True))
    assert ex.generation_answer(sc, g, "released") == "north <eos>"
    assert ex.generation_answer(sc, g, "default") == "north"


def test_same_context_donors():
    ctxs = ["the king of the north", "the river in the south", "the city of fire", "the king"]
    examples = [{"id": f"q{i}", "context": ctxs[i % 4], "question": f"question {i}", "answers": ["x"]}
                for i in range(23)]
    examples.append(dict(examples[5], id="dup"))  # a second question with the same prompt
    # a random subset is kept (the duplicate prompt may be kept through either question)
    kept = [ex.Kept(e, ex.PROMPT.format(context=e["context"], question=e["question"]), "x", None)
            for e in examples if float(torch.rand(())) < 0.7]
    got = ex.choose_donors(kept, examples, "released")
    want = rel_donors([k.example for k in kept], examples,
                      lambda e: ex.PROMPT.format(context=e["context"], question=e["question"]))
    for k, d in zip(kept, got):
        w = want.get(k.prompt)
        assert (d is None) == (w is None)
        if d is not None:
            assert d.prompt == ex.PROMPT.format(context=w["context"], question=w["question"])
            assert d.prompt != k.prompt and k.example["context"] in d.prompt
    # the default: the next kept example
    assert [d.example["id"] for d in ex.choose_donors(kept, examples)] == \
        [kept[(i + 1) % len(kept)].example["id"] for i in range(len(kept))]


# ------------------------------------------------------------------------- the trigger step
def test_last_trigger_step_is_the_released_stored_selection():
    m = tm.model("llama", scale=3.0).double()
    sae = random_sae(32, 64, "topk", k=6, dtype=torch.float64)
    tok = tm.tokenizer()
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    prompt = tok("the question is what river", return_tensors="pt")["input_ids"][0]
    free = sc.generate(prompt, max_new_tokens=7, stop_ids=[]).token_ids.tolist()
    hit = {free[1], free[4]}
    match = lambda t: t in hit  # noqa: E731
    gen, ref, _, _ = rel_generate(m, sae, prompt, 7, match=match)
    assert gen == free
    last = max(i for i, t in enumerate(free) if t in hit)
    first = min(i for i, t in enumerate(free) if t in hit)
    g = sc.score_at_trigger(prompt, trigger=match, max_new_tokens=7, stop_ids=[], trigger_at="last")
    assert g.trigger_step == last and g.token_ids.tolist() == free
    assert (g.scores.scores - ref).abs().max() <= 1e-9 * ref.abs().max()
    g1 = sc.score_at_trigger(prompt, trigger=match, max_new_tokens=7, stop_ids=[])
    assert g1.trigger_step == first and len(g1.token_ids) == first
    full = sc.generate(prompt, max_new_tokens=7, trigger=match, stop_ids=[], trigger_at="last")
    assert full.trigger_step == last and torch.equal(full.scores.scores, g.scores.scores)
    with pytest.raises(InputError, match="trigger_at"):
        sc.generate(prompt, max_new_tokens=3, trigger=match, trigger_at="second")
    with pytest.raises(InputError, match="whole generation"):
        sc.generate(prompt, max_new_tokens=3, trigger=match, trigger_at="last", stop_at_trigger=True)


# ------------------------------------------------------------------------- the residual stream dtype
def test_out_dtype_keeps_the_sae_dtype_after_the_hook():
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=tm.VOCAB,
                                  act_fn="gelu_new", normalization_type="LN", dtype=torch.float16,
                                  default_prepend_bos=False)
    ht = HookedTransformer(cfg).eval()
    sae = random_sae(32, 64, "topk", k=6, dtype=torch.float32)
    ids = torch.randint(len(tm.SPECIAL), tm.VOCAB, (1, 7))
    seen = {}
    rec = lambda name: (lambda t, hook: seen.__setitem__(name, t.dtype))  # noqa: E731
    ht.add_hook("blocks.1.hook_resid_pre", rec("pre1"))
    ht.add_hook("blocks.1.hook_resid_post", rec("post1"))

    def released_hook(act, hook):  # the released hook: the SAE's decode, returned as is
        return tm.dense_decode(sae, tm.dense_encode(sae, act.detach().to(torch.float32)))

    with torch.no_grad():
        ref = ht.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", released_hook)])
    assert seen == {"pre1": torch.float32, "post1": torch.float32}
    for out_dtype, want in ((torch.float32, torch.float32), (None, torch.float16)):
        seen.clear()
        sc = GradSAE(ht, sae, hook="blocks.0.hook_resid_post", out_dtype=out_dtype)
        with sc.spliced(), torch.no_grad():
            got = sc.model(input_ids=ids).logits
        assert seen == {"pre1": want, "post1": want}
        if out_dtype is not None:
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    ht.reset_hooks()
    # the splice itself: the SAE's decode, not cast back
    h = torch.randn(2, 5, 32).to(torch.float16)
    sc = GradSAE(ht, sae, hook="blocks.0.hook_resid_post", out_dtype=torch.float32)
    out = sc.splice(h)
    want = tm.dense_decode(sae, tm.dense_encode(sae, h.to(torch.float32)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="out_dtype"):
        GradSAE(ht, sae, hook="blocks.0.hook_resid_post", out_dtype="float32")


# ------------------------------------------------------------------------- the whole run
SHARED_QA = [
    ("the king of the north was red", "what king was red ?", "north"),
    ("the king of the north was red", "what was the king ?", "red"),
    ("the river in the south is blue", "what river is blue ?", "south"),
    ("the river in the south is blue", "what is the river ?", "blue"),
]


@pytest.fixture(scope="module")
def shared_qa():
    torch.manual_seed(0)
    tok = tm.tokenizer("right")
    texts = [tm.QA_TEMPLATE.format(context=c, question=q) + f" result = [[ {a} ]] <eos>" for c, q, a in SHARED_QA]
    enc = tok(texts, return_tensors="pt", padding=True)
    m = tm.model("llama", d=32, seed=0).train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(80):
        loss = m(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = m.eval().double()
    sae = tm.identity_sae(32).to(dtype=torch.float64)
    return m, tok, sae


def test_released_run_matches_the_released_semantics(shared_qa):
    m, tok, sae = shared_qa
    examples = [{"id": f"q{i}", "context": c, "question": q, "answers": [a]} for i, (c, q, a) in enumerate(SHARED_QA)]
    examples.append({"id": "wrong", "context": SHARED_QA[0][0], "question": SHARED_QA[0][1], "answers": ["king"]})
    marks = {tok.convert_tokens_to_ids("[["), tok.convert_tokens_to_ids("]]")}
    match = lambda t: t in marks  # noqa: E731  (two trigger tokens: first and last differ)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    ks = (0.5, 80)  # 80 > the positive scores: the released Top-K pads with zero-score latents
    res = ex.run_experiments(sc, examples, ks=ks, methods=("gradsae",), max_new_tokens=8, trigger=match,
                             template=tm.QA_TEMPLATE, progress=False, recipe="released")
    assert res.recipe["name"] == "released"
    prompt_of = lambda e: tm.QA_TEMPLATE.format(context=e["context"], question=e["question"])  # noqa: E731
    ids_of = lambda e: tok(prompt_of(e), return_tensors="pt")["input_ids"][0]  # noqa: E731

    ref = {}
    for e in examples:
        gen, s, mean_act, n_last = rel_generate(m, sae, ids_of(e), 8, match=match)
        ans = rel_answer(tok.decode(gen))
        if s is not None and rel_f1(ans, e["answers"]) >= 0.9:
            ref[e["id"]] = (s, n_last)
    assert res.n_kept == len(ref) >= 4 and "wrong" not in ref
    donors = rel_donors([e for e in examples if e["id"] in ref], examples, prompt_of)

    by = lambda study, qid, k, sel="top": next(  # noqa: E731
        (r for r in res.records if (r["study"], r["id"], r["K"], r["selection"]) == (study, qid, k, sel)), None)
    n_steered = 0
    for e in examples:
        if e["id"] not in ref:
            continue
        s, n_last = ref[e["id"]]
        for k in ks:
            n = k if isinstance(k, int) else n_last // 2
            for sel, pick in (("top", rel_top), ("bottom", rel_bottom)):
                r = by("perturbation", e["id"], k, sel)
                lat = pick(s, n)
                assert r["latents"] == lat
                gen = rel_generate(m, sae, ids_of(e), 8, zero_all=lat)[0]
                assert r["answer"] == rel_answer(tok.decode(gen))
            r = by("steering", e["id"], k)
            d = donors.get(prompt_of(e))
            if d is None:
                assert r is None
                continue
            n_steered += 1
            ds = ref[d["id"]][0]
            give = rel_top(ds, n if isinstance(k, int) else ref[d["id"]][1] // 2)
            vals = {j: min(max(float(ds[j]), 0.0), 50.0) for j in give}
            assert r["donor"] == d["id"] and r["latents"] == rel_top(s, n)
            assert list(r["donor_latents"]) == give
            assert all(abs(r["donor_latents"][j] - v) <= 1e-9 * max(1.0, abs(v)) for j, v in vals.items())
            gen = rel_generate(m, sae, ids_of(e), 8, zero_last=rel_top(s, n), set_last=vals)[0]
            assert r["answer"] == rel_answer(tok.decode(gen))
            assert r["donor_em"] == ex.exact_match(r["answer"], d["answers"])
    assert n_steered >= 2  # the two paragraphs with two kept questions


def test_clamp_binds_in_steering(shared_qa):
    """The clamp of the injected values, with a bound low enough to bind on this model (the
    released [0, 50] is the same code path with another bound)."""
    import dataclasses

    m, tok, sae = shared_qa
    examples = [{"id": f"q{i}", "context": c, "question": q, "answers": [a]} for i, (c, q, a) in enumerate(SHARED_QA[:2])]
    prompt_of = lambda e: tm.QA_TEMPLATE.format(context=e["context"], question=e["question"])  # noqa: E731
    ids_of = lambda e: tok(prompt_of(e), return_tensors="pt")["input_ids"][0]  # noqa: E731
    is_mark = lambda t: "[" in tok.decode([t])  # noqa: E731
    ref = {e["id"]: rel_generate(m, sae, ids_of(e), 8, match=is_mark)[1] for e in examples}
    top = rel_top(ref["q1"], 5)
    c = float(ref["q1"][top[2]])  # binds on the donor's two highest scores
    rec = dataclasses.replace(RELEASED, clamp=(0.0, c))
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tok)
    res = ex.run_experiments(sc, examples, ks=(5,), methods=("gradsae",), studies=("steering",), max_new_tokens=8,
                             template=tm.QA_TEMPLATE, progress=False, recipe=rec)
    r = next(r for r in res.records if r["id"] == "q0")
    assert r["donor"] == "q1" and list(r["donor_latents"]) == top
    vals = {j: min(max(float(ref["q1"][j]), 0.0), c) for j in top}
    assert sum(float(ref["q1"][j]) > c for j in top) == 2
    assert all(abs(r["donor_latents"][j] - v) <= 1e-9 * max(1e-30, abs(v)) for j, v in vals.items())
    gen = rel_generate(m, sae, ids_of(examples[0]), 8, zero_last=rel_top(ref["q0"], 5), set_last=vals)[0]
    assert r["answer"] == rel_answer(tok.decode(gen))


def test_cli_recipe_released(shared_qa, tmp_path, capsys):
    import copy
    import json

    from gradsae.cli import main

    m, tok, sae = shared_qa
    m32, s32 = copy.deepcopy(m).float(), sae.to(dtype=torch.float32)
    m32.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    s32.meta.hook_name = "blocks.0.hook_resid_post"
    s32.save(tmp_path / "sae")
    tm.squad_json(tmp_path / "squad.json", SHARED_QA[:2])
    (tmp_path / "t.txt").write_text(tm.QA_TEMPLATE)
    out = tmp_path / "r.json"
    common = ["--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae")]
    assert main(["experiment", *common, "--data", str(tmp_path / "squad.json"), "--ks", "1", "--max-new-tokens", "8",
                 "--template-file", str(tmp_path / "t.txt"), "--methods", "gradsae", "--recipe", "released",
                 "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    saved = json.loads(out.read_text())
    assert saved["recipe"]["name"] == "released" and saved["recipe"]["clamp"] == [0.0, 50.0]

    # select / ablate / steer with the released selection: Top-K padded with zero-score latents
    p0, p1 = (tm.QA_TEMPLATE.format(context=c, question=q) for c, q, _ in SHARED_QA[:2])
    is_mark = lambda t: "[" in tok.decode([t])  # noqa: E731
    ids = lambda p: tok(p, return_tensors="pt")["input_ids"][0]  # noqa: E731
    s0 = rel_generate(m32, s32, ids(p0), 8, match=is_mark)[1]
    s1 = rel_generate(m32, s32, ids(p1), 8, match=is_mark)[1]
    K = 80  # more than the positive scores
    scale = float(s1.abs().max())
    close = lambda a, b: abs(a - b) <= 1e-5 * scale  # noqa: E731  (float32 model: relative to the largest score)
    assert main(["select", *common, "--prompt", p0, "--k", str(K), "--trigger", "[", "--max-new-tokens", "8",
                 "--recipe", "released", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [t["latent"] for t in got["top"]] == rel_top(s0, K)
    assert [t["latent"] for t in got["bottom"]] == rel_bottom(s0, K)
    assert main(["ablate", *common, "--prompt", p0, "--top", str(K), "--trigger", "[", "--max-new-tokens", "8",
                 "--recipe", "released", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["latents"] == rel_top(s0, K)
    assert got["ablated"] == tok.decode(rel_generate(m32, s32, ids(p0), 8, zero_all=got["latents"])[0],
                                        skip_special_tokens=True)
    assert main(["steer", *common, "--prompt", p0, "--donor", p1, "--k", str(K), "--trigger", "[",
                 "--max-new-tokens", "8", "--recipe", "released", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["zero"] == rel_top(s0, K) and got["positions"] == "last"
    vals = {j: min(max(float(s1[j]), 0.0), 50.0) for j in rel_top(s1, K)}
    assert [int(j) for j in got["set"]] == list(vals)
    bad = {j: (got["set"][str(j)], v) for j, v in vals.items() if not close(got["set"][str(j)], v)}
    assert not bad, bad
