"""Corpus readers, tokenisation/windowing and token-budget batching."""

import json
import random

import pytest
import tiny_models as tm
import torch

from gradsae.corpus.batching import Cursor, make_batches, sequences
from gradsae.corpus.data import open_corpus
from gradsae.errors import InputError


def _docs(n, rng, max_words=40):
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 2, rng.randint(3, max_words)])
        out.append(" ".join(rng.choice(tm.WORDS) for _ in range(k)))
    return out


@pytest.fixture
def docs():
    return _docs(30, random.Random(torch.randint(0, 2**31, ()).item()))


# ------------------------------------------------------------------------------ readers
def test_text_reader_lines_and_start(tmp_path, docs):
    p = tmp_path / "c.txt"
    p.write_bytes(("\r\n".join(docs[:10]) + "\n" + "\n".join(docs[10:]) + "\n").encode())  # mixed line ends
    c = open_corpus(p)
    assert c.format == "text" and len(c) == len(docs)
    assert list(c.records()) == list(enumerate(docs))
    assert list(c.records(start=7)) == list(enumerate(docs))[7:]


def test_jsonl_reader_field_and_errors(tmp_path, docs):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)) + "\n")
    c = open_corpus(p, field="body")
    assert c.format == "jsonl" and len(c) == len(docs)
    assert [t for _, t in c.records()] == docs
    lines = p.read_text().splitlines()
    lines[4] = json.dumps({"id": 4, "other": "x"})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{p.name}:5: no field 'body'.*'other'"):
        list(open_corpus(p, field="body").records())
    lines[4] = "{not json"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{p.name}:5: not valid JSON"):
        list(open_corpus(p, field="body").records())
    lines[4] = json.dumps({"body": 3})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{p.name}:5: field 'body' is a int"):
        list(open_corpus(p, field="body").records())


def test_undecodable_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"the king\nbad \xff\xfe byte\nthe queen\n")
    with pytest.raises(InputError, match=rf"{p.name}:2: line is not valid UTF-8"):
        list(open_corpus(p).records())
    assert [t for _, t in open_corpus(p, encoding_errors="skip").records()] == ["the king", "", "the queen"]
    assert [t for _, t in open_corpus(p, encoding_errors="replace").records()][1] == "bad \ufffd\ufffd byte"
    q = tmp_path / "c.jsonl"
    q.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(InputError, match=rf"{q.name}:2: line is not valid UTF-8"):
        list(open_corpus(q).records())


def test_parquet_reader(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    vals = [d if i % 7 else None for i, d in enumerate(docs)]  # nulls read as empty documents
    pq.write_table(pa.table({"n": list(range(len(docs))), "text": vals}), p, row_group_size=4)
    c = open_corpus(p)
    assert c.format == "parquet" and len(c) == len(docs)
    want = [(i, v or "") for i, v in enumerate(vals)]
    assert list(c.records()) == want
    assert list(c.records(start=9)) == want[9:]  # starts inside a row group
    with pytest.raises(InputError, match="no column 'body'.*'n', 'text'"):
        open_corpus(p, field="body")
    with pytest.raises(InputError, match="column 'n' has type int64"):
        open_corpus(p, field="n")


def test_datasets_directory(tmp_path, docs):
    import datasets
    ds = datasets.Dataset.from_dict({"content": docs})
    ds.save_to_disk(str(tmp_path / "ds"))
    c = open_corpus(tmp_path / "ds", field="content")
    assert c.format == "datasets" and len(c) == len(docs)
    assert [t for _, t in c.records(start=3)] == docs[3:]
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"splits \['test', 'train'\]; choose one"):
        open_corpus(tmp_path / "dd", field="content")
    assert [t for _, t in open_corpus(tmp_path / "dd", field="content", split="test").records()] == docs[:5]


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_corpus(tmp_path / "missing.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        open_corpus(tmp_path / "d", format="text")
    with pytest.raises(InputError, match="unknown data format"):
        open_corpus(tmp_path / "d", format="csv")
    with pytest.raises(InputError, match="document 1 is a int"):
        open_corpus(["a", 3])


# ------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("long", ["window", "truncate"])
def test_sequences_cover_documents(docs, long):
    tok = tm.tokenizer()
    L = 7
    seqs = list(sequences(open_corpus(docs), tok, L, long))
    for i, d in enumerate(docs):
        ids = tok(d)["input_ids"]
        mine = [s for s in seqs if s.doc == i]
        if not ids:
            assert mine == []
            continue
        if long == "truncate":
            assert len(mine) == 1 and mine[0].ids == ids[:L] and mine[0].offset == 0
        else:  # consecutive windows that put the document back together
            assert [s.offset for s in mine] == list(range(0, len(ids), L))
            assert sum((s.ids for s in mine), []) == ids
            assert all(1 <= len(s.ids) <= L for s in mine)


def test_min_length_drops_short_pieces(docs):
    tok = tm.tokenizer()
    seqs = list(sequences(open_corpus(docs), tok, 5, "window", min_length=2))
    assert seqs and all(len(s.ids) >= 2 for s in seqs)
    n_short = sum(1 for d in docs for w in range(0, len(tok(d)["input_ids"]), 5)
                  if len(tok(d)["input_ids"][w:w + 5]) < 2)
    assert len(seqs) == len(list(sequences(open_corpus(docs), tok, 5, "window"))) - n_short


def test_batches_respect_budget_and_restart(docs):
    tok = tm.tokenizer()
    c = open_corpus(docs)
    kw = dict(max_length=9, batch_tokens=20, pad_id=0)
    bs = list(make_batches(c, tok, **kw))
    seqs = list(sequences(c, tok, 9))
    got = []
    for b in bs:
        B, T = b.input_ids.shape
        assert B * T <= 20 or B == 1
        for r in range(B):
            n = int(b.attention_mask[r].sum())
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()  # right padding
            got.append((int(b.doc_ids[r]), int(b.offsets[r]), b.input_ids[r, :n].tolist()))
    assert got == [(s.doc, s.offset, s.ids) for s in seqs]  # every sequence once, in order
    assert [b.index for b in bs] == list(range(len(bs)))
    # restarting at any batch's cursor reproduces the rest exactly
    for i in (1, len(bs) // 2, len(bs) - 1):
        again = list(make_batches(c, tok, start=bs[i].start, first_index=i, **kw))
        assert len(again) == len(bs) - i
        for x, y in zip(again, bs[i:]):
            assert x.index == y.index and x.start == y.start
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.attention_mask, y.attention_mask)
            assert torch.equal(x.doc_ids, y.doc_ids) and torch.equal(x.offsets, y.offsets)
    assert bs[0].start == Cursor(seqs[0].doc, 0)
