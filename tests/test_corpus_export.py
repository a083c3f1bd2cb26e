"""gradsae export: Neuronpedia's feature/activation JSON (field names, types, limits, values
against the run's example tables), the static HTML page (every latent of the run's top table,
the examples' tokens, nothing fetched), atomic writing, and the CLI end to end on a scored
corpus."""

from __future__ import annotations

import html as htmlmod
import json
import os
import re

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae import Influence, LatentStats
from gradsae.cli import main
from gradsae.corpus import export as E
from gradsae.corpus.examples import TopExamples
from gradsae.corpus.report import latents_arrow
from gradsae.errors import InputError


def _synthetic_run(tmp_path, d_sae=300, T=40, B=3, K=6, n=3, context=4):
    """A run directory written by write_outputs from random sparse influence (no model): more
    latents than one Neuronpedia batch holds. Returns (path, examples, stats)."""
    from gradsae.corpus.report import write_outputs

    idx = torch.stack([torch.stack([torch.randperm(d_sae)[:K] for _ in range(T)]) for _ in range(B)])
    acts = torch.rand(B, T, K)
    scores = torch.randn(B, T, K)
    inf = Influence(idx, acts, torch.zeros_like(acts), scores, d_sae)
    mask = torch.ones(B, T, dtype=torch.bool)
    ids = torch.randint(0, 1000, (B, T))
    ex = TopExamples(d_sae, n, context)
    ex.update(inf, mask, ids, torch.ones_like(ids), torch.arange(B), torch.zeros(B, dtype=torch.long))
    st = LatentStats(d_sae)
    st.update(inf, mask)
    out = tmp_path / "run"
    out.mkdir()
    meta = {"model": {"name": "m"}, "hook": "blocks.0.hook_resid_post", "objective": "loglik", "tokens": B * T,
            "sign": {"y": "Y", "positive": "helps"}, "documents": B, "sae": {"d_sae": d_sae},
            "active_latents": int((st.count > 0).sum())}
    write_outputs(out, st, ex, meta, tokenizer=None, plot=False)
    return out, ex, st


ACT_KEYS = {"tokens", "values", "maxValue", "maxValueTokenIndex"}


def _check_activation(a, max_tokens=E.MAX_TOKENS):
    assert set(a) == ACT_KEYS
    assert isinstance(a["tokens"], list) and all(isinstance(t, str) for t in a["tokens"])
    assert isinstance(a["values"], list) and all(isinstance(v, float) for v in a["values"])
    assert 1 <= len(a["tokens"]) == len(a["values"]) <= max_tokens
    assert isinstance(a["maxValue"], float) and isinstance(a["maxValueTokenIndex"], int)
    assert not isinstance(a["maxValueTokenIndex"], bool)
    assert a["maxValue"] == max(a["values"]) and a["values"].index(a["maxValue"]) == a["maxValueTokenIndex"]


@pytest.mark.parametrize("values", ["act", "score"])
def test_neuronpedia_json_fields_limits_and_values(tmp_path, values):
    run, ex, st = _synthetic_run(tmp_path)
    files = E.write_neuronpedia(run, values=values)
    assert files and all(f.parent == tmp_path / "run-neuronpedia" for f in files)
    assert sorted(p.name for p in (tmp_path / "run-neuronpedia").iterdir()) == sorted(f"batch-{i}.json"
                                                                                       for i in range(len(files)))
    feats = []
    for i, f in enumerate(files):
        b = json.loads(f.read_text())
        assert set(b) == {"modelId", "layer", "features"} and b["modelId"] == "m"
        assert b["layer"] == "blocks.0.hook_resid_post"
        assert 1 <= len(b["features"]) <= E.FEATURES_PER_BATCH
        if i < len(files) - 1:
            assert len(b["features"]) == E.FEATURES_PER_BATCH
        feats += b["features"]
    # every latent with an example, in order, with its top then bottom examples
    want = [j for j in range(ex.d_sae) if ex.rows(j) or ex.rows(j, "bottom")]
    assert [f["index"] for f in feats] == want and len(want) > E.FEATURES_PER_BATCH
    for f in feats:
        assert set(f) == {"index", "activations"} and isinstance(f["index"], int)
        rows = ex.rows(f["index"]) + ex.rows(f["index"], "bottom")
        assert len(f["activations"]) == len(rows)
        for a, r in zip(f["activations"], rows):
            _check_activation(a)
            assert a["tokens"] == [str(t) for t in r["ctx"]]  # no tokenizer: ids as text
            assert a["values"] == (r["acts"] if values == "act" else r["scores"])


def test_neuronpedia_windows_over_1024_tokens_are_cut_around_the_example(tmp_path):
    run, ex, _ = _synthetic_run(tmp_path, d_sae=8, T=1400, B=1, K=2, n=2, context=700)
    feats = E.neuronpedia_features(E.load_run(run), values="score")
    n_long = 0
    for f in feats:
        rows = ex.rows(f["index"]) + ex.rows(f["index"], "bottom")
        for a, r in zip(f["activations"], rows):
            _check_activation(a)
            n_long += len(r["ctx"]) > E.MAX_TOKENS
            # the example's own token is kept: its score is in the window at the same offset
            lo = max(0, min(r["center"] - E.MAX_TOKENS // 2, len(r["ctx"]) - E.MAX_TOKENS))
            assert a["values"] == r["scores"][lo:lo + E.MAX_TOKENS]
            assert a["tokens"][r["center"] - lo] == str(r["ctx"][r["center"]])
    assert n_long > 0


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="gradsae-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_holds_every_latent_of_the_top_table_and_the_examples(tmp_path):
    import pandas as pd

    run, ex, st = _synthetic_run(tmp_path)
    df = pd.read_parquet(run / "latents.parquet")
    for by, top in (("relu_sum", 25), ("abs_sum", 0), ("count", 7)):
        out = E.write_html(run, tmp_path / f"p-{by}.html", top=top or None, by=by)
        page = out.read_text(encoding="utf-8")
        # the run's top table, computed here from the parquet: active latents by `by`, ties by latent
        act = df[df["count"] > 0].sort_values([by, "latent"], ascending=[False, True])
        want = act["latent"].tolist()[: top or None]
        data = _embedded(page)
        assert [r[0] for r in data["latents"]] == want
        assert data["columns"][0] == "latent" and by in data["columns"]
        col = data["columns"].index(by)
        assert [r[col] for r in data["latents"]] == pytest.approx(act[by].tolist()[: top or None])
        assert sorted(map(int, data["examples"])) == sorted(want)
        for j in want[:5]:
            for side in ("top", "bottom"):
                got = data["examples"][str(j)][side]
                rows = ex.rows(j, side)
                assert [(e[0], e[1], e[2], e[4]) for e in got] == [(r["doc"], r["pos"], r["score"], r["center"])
                                                                  for r in rows]
                assert [e[5] for e in got] == [[str(t) for t in r["ctx"]] for r in rows]
                assert [e[7] for e in got] == [pytest.approx(r["scores"]) for r in rows]
        # self-contained: nothing is loaded from anywhere
        assert not re.search(r"\b(src|href)\s*=|@import|url\(|https?://", page)
        assert "<style>" in page and "<script>" in page


def test_html_escapes_tokens(tmp_path):
    run, ex, st = _synthetic_run(tmp_path, d_sae=6)
    r = E.load_run(run)
    import pyarrow as pa

    # a token that would close the script element or inject markup, put into the table
    col = r.table.column("top_examples").to_pylist()
    j = next(i for i, v in enumerate(col) if v)
    col[j][0]["tokens"][0] = "</script><b>x</b>&amp;\u2028"
    t = r.table.set_column(r.table.column_names.index("top_examples"), "top_examples",
                           pa.array(col, r.table.schema.field("top_examples").type))
    page = E.html_page(E.Run(r.path, r.meta, t), top=None)
    assert page.count("</script>") == 2 and "<b>x</b>" not in page
    assert _embedded(page)["examples"][str(j)]["top"][0][5][0] == "</script><b>x</b>&amp;\u2028"


def test_writing_is_atomic(tmp_path, monkeypatch):
    run, _, _ = _synthetic_run(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    real = json.dumps
    calls = {"n": 0}

    def failing(obj, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch file
            raise OSError(28, "No space left on device")
        return real(obj, **kw)

    monkeypatch.setattr(E.json, "dumps", failing)
    with pytest.raises(OSError, match="No space"):
        E.write_neuronpedia(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no directory, no temporary left
    monkeypatch.setattr(E.json, "dumps", real)
    files = E.write_neuronpedia(run)
    kept = {f.name: f.read_bytes() for f in files}
    # a failed replacement keeps the previous export whole
    calls["n"] = 0
    monkeypatch.setattr(E.json, "dumps", failing)
    with pytest.raises(OSError):
        E.write_neuronpedia(run, overwrite=True)
    assert {f.name: f.read_bytes() for f in (tmp_path / "run-neuronpedia").iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["run-neuronpedia"])
    monkeypatch.setattr(E.json, "dumps", real)

    # the page: a failure while writing leaves no file and no temporary
    page_path = tmp_path / "run.html"

    def broken_fsync(fd):  # the page's bytes are written, then the disk fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        E.write_html(run)
    monkeypatch.undo()
    assert not page_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["run-neuronpedia"])
    E.write_html(run)
    with pytest.raises(InputError, match="exists.*overwrite"):
        E.write_html(run)
    E.write_html(run, overwrite=True)


def test_old_or_missing_runs_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such run directory"):
        E.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no finished run"):
        E.load_run(tmp_path / "empty")
    run, _, _ = _synthetic_run(tmp_path)
    import pyarrow.parquet as pq

    t = pq.read_table(run / "latents.parquet").drop_columns(["bottom_examples"])
    pq.write_table(t, run / "latents.parquet")
    with pytest.raises(InputError, match="bottom_examples.*score the corpus again"):
        E.load_run(run)


def test_cli_export_of_a_scored_corpus(tmp_path, capsys):
    """`gradsae score` then `gradsae export` both ways on a tiny GPT-2: the page lists the top
    latents by relu_sum of the run's statistics, and the JSON's values are the run's per-token
    activations of each example window."""
    seed = int(torch.randint(0, 2**30, ()).item())
    model = tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0)
    tok = tm.tokenizer()
    sae = random_sae(32, 64, "topk", k=4, seed=seed + 1)
    docs = [" ".join(tm.WORDS[(i * 7 + k) % len(tm.WORDS)] for k in range(5 + i % 9)) for i in range(10)]
    res = gradsae.score_corpus(model, sae, docs, hook="blocks.1.hook_resid_post", tokenizer=tok, out=tmp_path / "r",
                               max_length=12, top_n=2, context=3, progress=False)
    assert main(["export", str(tmp_path / "r"), "--format", "html", "--top", "10"]) == 0
    assert main(["export", str(tmp_path / "r"), "--format", "neuronpedia"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and str(tmp_path / "r.html") in err
    data = _embedded((tmp_path / "r.html").read_text(encoding="utf-8"))
    idx, _ = res.stats.top(10, by="relu_sum")
    assert sorted(r[0] for r in data["latents"]) == sorted(idx.tolist())
    for f in json.loads((tmp_path / "r-neuronpedia" / "batch-0.json").read_text())["features"]:
        rows = res.examples.rows(f["index"]) + res.examples.rows(f["index"], "bottom")
        assert [a["tokens"] for a in f["activations"]] == [[tok.decode([t]) for t in r["ctx"]] for r in rows]
        assert [a["values"] for a in f["activations"]] == [r["acts"] for r in rows]
    assert sorted(os.listdir(tmp_path)) == ["r", "r-neuronpedia", "r.html"]
