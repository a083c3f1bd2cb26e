"""score_corpus end to end on a tiny GPT-2: statistics and top examples against an independent
dense float64 computation, the output directory, and the bad-input rules."""

import copy
import json
import random

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae.errors import InputError

LAYER, D, DSAE, K, L = 1, 32, 64, 4, 12


def _corpus(rng, n=14):
    docs = []
    for i in range(n):
        k = rng.choice([0, 1, rng.randint(2, 40)]) if i % 4 == 3 else rng.randint(2, 40)
        docs.append(" ".join(rng.choice(tm.WORDS) for _ in range(k)))
    return docs


@pytest.fixture
def setup():
    seed = int(torch.randint(0, 2**31, ()).item())
    model = tm.model("gpt2", d=D, layers=2, seed=seed, scale=3.0)
    sae = random_sae(D, DSAE, "topk", k=K, seed=seed + 1)
    return model, sae, tm.tokenizer(), _corpus(random.Random(seed))


def _dense_reference(model, sae, tok, docs, mode, objective="loglik"):
    """Per window, in float64: dense latents with retain_grad, Y = the mean log-probability of
    each actual next token (the default objective; or the mean next-token loss), backward;
    every (doc, pos, latent) with z != 0 and its score z * dY/dz."""
    m = copy.deepcopy(model).double()
    s64 = gradsae.SAE(sae.W_enc.double(), sae.b_enc.double(), sae.W_dec.double(), sae.b_dec.double(), "topk", k=K)
    rows = []
    for doc, text in enumerate(docs):
        ids = tok(text)["input_ids"]
        for w in range(0, len(ids), L):
            piece = torch.tensor(ids[w:w + L])
            if len(piece) < 2:
                continue
            hook = tm.DenseSplice(tm.layer_module(m, LAYER), s64, mode)
            try:
                logits = m(piece[None]).logits[0]
                logp = logits[:-1].log_softmax(-1).gather(-1, piece[1:, None]).squeeze(-1)
                (logp.mean() if objective == "loglik" else -logp.mean()).backward()
            finally:
                hook.remove()
            z = hook.zs[0]
            sc = (z.grad * z)[0].detach()
            z = z[0].detach()
            for t, j in (z != 0).nonzero().tolist():
                rows.append((doc, w + t, j, float(z[t, j]), float(sc[t, j])))
    return rows


@pytest.mark.parametrize("mode", ["splice", "error"])
def test_statistics_match_dense_reference(setup, tmp_path, mode):
    model, sae, tok, docs = setup
    out = tmp_path / "run"
    res = gradsae.score_corpus(model, sae, docs, hook=f"blocks.{LAYER}.hook_resid_post", mode=mode, tokenizer=tok,
                               out=out, max_length=L, batch_tokens=40, top_n=3, context=2, progress=False)
    ref = _dense_reference(model, sae, tok, docs, mode)
    n_tok = sum(len(range(0, len(tok(d)["input_ids"]), L)) and sum(
        len(tok(d)["input_ids"][w:w + L]) for w in range(0, len(tok(d)["input_ids"]), L)
        if len(tok(d)["input_ids"][w:w + L]) >= 2) for d in docs)
    st = res.stats
    assert st.tokens == n_tok
    count = torch.zeros(DSAE, dtype=torch.int64)
    sums = {f: torch.zeros(DSAE, dtype=torch.float64) for f in ("act_sum", "score_sum", "relu_sum", "abs_sum")}
    smax = torch.full((DSAE,), float("-inf"), dtype=torch.float64)
    for _, _, j, a, s in ref:
        count[j] += 1
        sums["act_sum"][j] += a
        sums["score_sum"][j] += s
        sums["relu_sum"][j] += max(s, 0.0)
        sums["abs_sum"][j] += abs(s)
        smax[j] = max(smax[j], s)
    assert torch.equal(st.count, count)
    scale = max(1e-3, max(abs(s) for *_, s in ref))
    for f, v in sums.items():
        torch.testing.assert_close(getattr(st, f), v, atol=1e-4 * scale * 50, rtol=1e-4)
    act = count > 0
    torch.testing.assert_close(st.score_max[act], smax[act], atol=1e-4 * scale, rtol=1e-4)
    assert torch.isinf(st.score_max[~act]).all()

    # top examples: the 3 best (doc, pos) per latent by score, where the ranking is clear
    by_lat = {}
    for doc, pos, j, a, s in ref:
        by_lat.setdefault(j, []).append((s, doc, pos, a))
    for j in range(DSAE):
        want = sorted(by_lat.get(j, []), key=lambda r: (-r[0], r[1], r[2]))[:3]
        got = res.examples.rows(j)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert abs(g["score"] - w[0]) <= 1e-4 * scale and abs(g["act"] - w[3]) <= 1e-4 * max(1.0, abs(w[3]))
        ss = [s for s, *_ in sorted(by_lat.get(j, []), key=lambda r: -r[0])]
        for r, (g, w) in enumerate(zip(got, want)):
            gaps = [abs(ss[r] - ss[q]) for q in (r - 1, r + 1) if 0 <= q < len(ss)]
            if all(gp > 1e-3 * scale for gp in gaps):
                assert (g["doc"], g["pos"]) == (w[1], w[2])
                ids = tok(docs[w[1]])["input_ids"]
                assert g["ctx"][g["center"]] == ids[w[2]]

    # the output directory
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["stats.safetensors", "examples.safetensors", "latents.parquet", "report.png", "meta.json"])
    assert gradsae.LatentStats.load(out / "stats.safetensors") == st
    import pandas as pd

    df = pd.read_parquet(out / "latents.parquet")
    assert len(df) == DSAE and (df["count"].to_numpy() == count.numpy()).all()
    j = int(count.argmax())
    top = list(df["top_examples"][j])
    assert [(e["doc"], e["pos"]) for e in top] == [(r["doc"], r["pos"]) for r in res.examples.rows(j)]
    # every example's decoded token and its left and right context, rebuilt from the document:
    # +-2 tokens around the position, within the position's window of L tokens
    def dec(t):
        return tok.decode(t, skip_special_tokens=False)

    checked = 0
    for lat in range(DSAE):
        for e in df["top_examples"][lat]:
            ids = tok(docs[e["doc"]])["input_ids"]
            p, start = e["pos"], (e["pos"] // L) * L
            end = min(len(ids), start + L)
            assert e["token"] == dec([ids[p]])
            assert e["left"] == dec(ids[max(start, p - 2):p]) and e["right"] == dec(ids[p + 1:min(end, p + 3)])
            checked += 1
    assert checked >= DSAE // 2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["tokens"] == n_tok and meta["hook"] == f"blocks.{LAYER}.hook_resid_post"
    assert meta["objective"] == "loglik" and meta["mode"] == mode and meta["sae"]["d_sae"] == DSAE
    assert "helps the model predict the next token" in meta["sign"]["positive"]
    assert "log-probability of each actual next token" in meta["sign"]["y"]
    assert meta["documents"] == sum(1 for d in docs if len(tok(d)["input_ids"]) >= 2)
    assert {"gradsae", "torch", "transformers"} <= set(meta["versions"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_objective_is_the_default_with_the_sign_flipped(setup):
    """objective="loss" stays available: the same tokens and latents, every score negated
    (relu of the negated scores is |s| - relu(s)); meta says what the sign means."""
    model, sae, tok, docs = setup
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, max_length=L, batch_tokens=40, progress=False)
    ll = gradsae.score_corpus(model, sae, docs, **kw)
    loss = gradsae.score_corpus(model, sae, docs, objective="loss", **kw)
    assert ll.meta["objective"] == "loglik" and loss.meta["objective"] == "loss"
    assert "raises the loss" in loss.meta["sign"]["positive"]
    assert torch.equal(ll.stats.count, loss.stats.count) and ll.stats.tokens == loss.stats.tokens
    scale = float(loss.stats.abs_sum.max())
    assert scale > 0
    tol = dict(rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(ll.stats.score_sum, -loss.stats.score_sum, **tol)
    torch.testing.assert_close(ll.stats.abs_sum, loss.stats.abs_sum, **tol)
    torch.testing.assert_close(ll.stats.relu_sum, loss.stats.abs_sum - loss.stats.relu_sum, **tol)
    torch.testing.assert_close(ll.stats.act_sum, loss.stats.act_sum, **tol)


def test_output_directory_rules(setup, tmp_path):
    model, sae, tok, docs = setup
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, max_length=L, batch_tokens=64, progress=False)
    out = tmp_path / "run"
    first = gradsae.score_corpus(model, sae, docs, out=out, **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match="holds a finished run.*overwrite"):
        gradsae.score_corpus(model, sae, docs, out=out, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    again = gradsae.score_corpus(model, sae, docs[:5], out=out, overwrite=True, **kw)
    assert again.stats.tokens < first.stats.tokens
    assert gradsae.LatentStats.load(out / "stats.safetensors") == again.stats
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not from a gradsae run.*notes.txt"):
        gradsae.score_corpus(model, sae, docs, out=other, **kw)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_bad_input_writes_nothing(setup, tmp_path):
    model, sae, tok, docs = setup
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, max_length=L, progress=False)
    out = tmp_path / "run"
    wrong = random_sae(D + 8, DSAE, "topk", k=K, seed=3)
    with pytest.raises(InputError, match="d_in=40 does not match"):
        gradsae.score_corpus(model, wrong, docs, out=out, **kw)
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d or "the"}) for d in docs]
    lines[6] = json.dumps({"body": "the king"})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{p.name}:7: no field 'text'"):
        gradsae.score_corpus(model, sae, p, out=out, **kw)
    with pytest.raises(InputError, match="no tokens to score"):
        gradsae.score_corpus(model, sae, ["", "  ", "the"], out=out, **kw)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        gradsae.score_corpus(model, sae, docs, out=out, **{**kw, "tokenizer": None})
    assert not out.exists()


def test_bf16_autocast_changes_the_arithmetic_not_the_accounting(setup):
    model, sae, tok, docs = setup
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, max_length=L, batch_tokens=64, progress=False)
    a = gradsae.score_corpus(model, sae, docs, **kw)
    b = gradsae.score_corpus(model, sae, docs, autocast="bf16", **kw)
    assert b.meta["config"]["autocast"] == "bf16"
    assert b.stats.tokens == a.stats.tokens and b.meta["documents"] == a.meta["documents"]
    assert torch.isfinite(b.stats.abs_sum).all()
    assert not torch.equal(a.stats.abs_sum, b.stats.abs_sum)  # autocast was in effect
    rel = (a.stats.abs_sum - b.stats.abs_sum).abs().sum() / a.stats.abs_sum.sum()
    assert rel < 0.25


def test_corpus_is_streamed_not_read_ahead(setup):
    """Each batch is attributed having read only a bounded window of the corpus ahead of it
    (the tokeniser's chunk), never the whole corpus: memory does not grow with its length."""
    from gradsae.corpus.data import ListCorpus

    ahead_max = 128  # documents: two of the tokeniser's chunks of 64

    model, sae, tok, _ = setup
    rng = random.Random(0)
    docs = [" ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(2, 10))) for _ in range(3 * ahead_max)]

    class Counting(ListCorpus):
        pulled = 0

        def records(self, start: int = 0):
            for i, d in super().records(start):
                Counting.pulled = i + 1
                yield i, d

    seen = []  # (records read, highest document in the batch) at each batch's forward
    layer = tm.layer_module(model, LAYER)

    def note(mod, args):
        seen.append(Counting.pulled)

    h = layer.register_forward_pre_hook(note)
    try:
        res = gradsae.score_corpus(model, sae, Counting(docs), hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok,
                                   max_length=L, batch_tokens=64, progress=False)
    finally:
        h.remove()
    assert res.meta["documents"] == len(docs) and len(seen) == res.meta["batches"] > 30
    # the first batches run before the corpus beyond the first tokeniser chunks has been read
    assert seen[0] <= ahead_max
    # and the read position advances with the batches, never far ahead of them
    per_batch = len(docs) / len(seen)
    ahead = [r - (i + 1) * per_batch for i, r in enumerate(seen)]
    assert max(ahead) <= ahead_max, max(ahead)


# ---------------------------------------------------------------------------- checks before the first batch
def _gpt2(positions):
    import transformers as tf

    cfg = tm.config("gpt2", d=D)
    cfg.n_positions = positions
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_max_length_must_fit_the_model_positions(tmp_path):
    from gradsae.corpus import preflight

    tok = tm.tokenizer()
    sae = random_sae(D, DSAE, "topk", k=K, seed=1)
    docs = [" ".join(["the king"] * 30)] * 3  # 60 tokens each
    hook = f"blocks.{LAYER}.hook_resid_post"
    small = _gpt2(32)  # a learned table of 32 positions: index 32 would fail inside the model
    with pytest.raises(InputError, match=r"max_length=1000 does not fit.*learned table of 32 positions"):
        gradsae.score_corpus(small, sae, docs, hook=hook, tokenizer=tok, max_length=1000, out=tmp_path / "a",
                             progress=False)
    assert not (tmp_path / "a").exists()
    res = gradsae.score_corpus(small, sae, docs, hook=hook, tokenizer=tok, progress=False)
    assert res.meta["config"]["max_length"] == 32 and res.meta["sequences"] == 6  # windows of the default
    # rotary: no table, but trained on max_position_embeddings; a rope scaling factor extends it
    llama = tm.model("llama", d=D, seed=0)
    assert preflight.position_limit(llama) == (128, False, "config.max_position_embeddings")
    with pytest.raises(InputError, match="trained on 128 positions"):
        gradsae.score_corpus(llama, sae, docs, hook=hook, tokenizer=tok, max_length=200, progress=False)
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    if hasattr(llama.config, "rope_parameters"):  # transformers 5; 4.x calls it rope_scaling
        llama.config.rope_parameters = scaled
    else:
        llama.config.rope_scaling = scaled
    assert preflight.position_limit(llama)[0] == 256
    # a model that states no limit
    assert preflight.position_limit(torch.nn.Linear(2, 2)) is None
    assert preflight.resolve_max_length(torch.nn.Linear(2, 2), None) == preflight.DEFAULT_MAX_LENGTH


def test_hook_other_than_the_saes_own_warns(setup):
    model, sae, tok, docs = setup
    sae.meta.hook_name = f"blocks.{LAYER}.hook_resid_post"
    kw = dict(tokenizer=tok, max_length=L, progress=False)
    with pytest.warns(UserWarning, match=r"scoring at hook 'blocks.0.hook_resid_post'.*trained at 'blocks.1"):
        gradsae.score_corpus(model, sae, docs[:2], hook="blocks.0.hook_resid_post", **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the same place spelled as a module path, or taken from the metadata: no warning
        a = gradsae.score_corpus(model, sae, docs[:4], hook=f"transformer.h.{LAYER}", **kw)
        b = gradsae.score_corpus(model, sae, docs[:4], **kw)
    assert a.stats == b.stats


def test_devices_that_do_not_exist_are_refused_before_anything_runs(setup, tmp_path):
    model, sae, tok, docs = setup
    kw = dict(hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, out=tmp_path / "r", progress=False)
    for dev in ("tpu", "cuda:99", *(["cuda"] if not torch.cuda.is_available() else [])):
        with pytest.raises(InputError, match="device"):
            gradsae.score_corpus(model, sae, docs, device=dev, **kw)
    assert not (tmp_path / "r").exists()
    assert next(model.parameters()).device.type == "cpu"


def test_probe_writable_leaves_the_file_system_as_it_was(tmp_path):
    from gradsae.corpus.resume import probe_writable

    probe_writable(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    probe_writable(tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        probe_writable(tmp_path / "f" / "run")


def test_run_config_is_what_meta_json_records(setup, tmp_path):
    import dataclasses

    from gradsae.corpus import RunConfig, run_corpus

    model, sae, tok, docs = setup
    cfg = RunConfig(hook=f"blocks.{LAYER}.hook_resid_post", max_length=L, batch_tokens=40, top_n=3, context=2,
                    out=tmp_path / "run", progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_n = 4
    with pytest.raises(InputError, match="resume=True and overwrite=True"):
        dataclasses.replace(cfg, resume=True, overwrite=True)
    with pytest.raises(InputError, match="needs target="):
        RunConfig(objective="logprob")
    with pytest.raises(InputError, match="takes no target"):
        RunConfig(objective="loss", objective_kwargs={"target": 3})
    with pytest.raises(InputError, match="unexpected setting.*batch_token"):  # a misspelt batch_tokens
        gradsae.score_corpus(model, sae, docs, tokenizer=tok, batch_token=64)
    res = run_corpus(model, sae, docs, cfg, tokenizer=tok)
    rec = json.loads((tmp_path / "run" / "meta.json").read_text())["config"]
    want = cfg.resolved(device="cpu").record()
    assert {k: rec[k] for k in want} == want
    assert set(rec) - set(want) == {"data", "model", "sae", "tokenizer", "world_size"}
    same = gradsae.score_corpus(model, sae, docs, hook=f"blocks.{LAYER}.hook_resid_post", max_length=L,
                                batch_tokens=40, top_n=3, context=2, tokenizer=tok, progress=False)
    assert same.stats == res.stats and same.meta["config"] == res.meta["config"]


def test_ctrl_c_without_an_output_directory_is_a_plain_interrupt(setup):
    from gradsae.corpus import RunInterrupted

    model, sae, tok, docs = setup

    def stop(*a):
        raise KeyboardInterrupt

    h = tm.layer_module(model, 0).register_forward_pre_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt) as ei:
            gradsae.score_corpus(model, sae, docs, hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok,
                                 max_length=L, progress=False)
    finally:
        h.remove()
    assert not isinstance(ei.value, RunInterrupted)


def test_bottom_examples_and_windows_match_dense_reference(setup, tmp_path):
    """The bottom examples (most negative scores) and every example's per-token window values
    (activation and score of its latent at each token of the window) against the dense float64
    per-token scores; latents.parquet carries the same, with the window's decoded tokens."""
    model, sae, tok, docs = setup
    out = tmp_path / "run"
    c = 2
    res = gradsae.score_corpus(model, sae, docs, hook=f"blocks.{LAYER}.hook_resid_post", tokenizer=tok, out=out,
                               max_length=L, batch_tokens=40, top_n=3, context=c, progress=False)
    ref = _dense_reference(model, sae, tok, docs, "splice")
    dense = {(doc, pos, j): (a, s) for doc, pos, j, a, s in ref}
    scale = max(1e-3, max(abs(s) for *_, s in ref))
    by_lat = {}
    for doc, pos, j, a, s in ref:
        by_lat.setdefault(j, []).append((s, doc, pos, a))
    checked = 0
    for j in range(DSAE):
        neg = sorted([r for r in by_lat.get(j, []) if r[0] < 0])
        got = res.examples.rows(j, "bottom")
        # scores within rounding of 0 may fall on either side of it
        clear = sum(1 for s, *_ in by_lat.get(j, []) if s < -1e-4 * scale)
        near = sum(1 for s, *_ in by_lat.get(j, []) if s < 1e-4 * scale)
        assert min(3, clear) <= len(got) <= min(3, near)
        for g, w in zip(got, neg):
            assert g["score"] < 0 and abs(g["score"] - w[0]) <= 1e-4 * scale
        for side in ("top", "bottom"):
            for g in res.examples.rows(j, side):
                ids = tok(docs[g["doc"]])["input_ids"]
                start = (g["pos"] // L) * L
                lo, hi = max(start, g["pos"] - c), min(len(ids), start + L, g["pos"] + c + 1)
                assert g["ctx"] == ids[lo:hi] and g["center"] == g["pos"] - lo
                want = [dense.get((g["doc"], p, j), (0.0, 0.0)) for p in range(lo, hi)]
                assert max(abs(x - w[1]) for x, w in zip(g["scores"], want)) <= 1e-4 * scale
                assert max(abs(x - w[0]) / max(1.0, abs(w[0])) for x, w in zip(g["acts"], want)) <= 1e-4
                checked += 1
    assert checked >= DSAE // 2
    import pandas as pd

    df = pd.read_parquet(out / "latents.parquet")
    for j in range(DSAE):
        for side in ("top", "bottom"):
            rows = res.examples.rows(j, side)
            got = list(df[f"{side}_examples"][j])
            assert [(e["doc"], e["pos"], e["center"]) for e in got] == [(r["doc"], r["pos"], r["center"])
                                                                         for r in rows]
            for e, r in zip(got, rows):
                assert list(e["tokens"]) == [tok.decode([t]) for t in r["ctx"]]
                assert list(e["scores"]) == r["scores"] and list(e["acts"]) == r["acts"]
                assert e["tokens"][e["center"]] == e["token"]
