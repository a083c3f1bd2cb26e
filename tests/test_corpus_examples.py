"""TopExamples: the top-N and bottom-N examples per latent against a brute-force sort, the
per-token values of every example's window against dense per-token tables, order
independence, and context windows."""

import random

import pytest
import torch

from gradsae import Influence
from gradsae.corpus.examples import TopExamples
from gradsae.errors import InputError


def _random_batch(B, T, K, d_sae, ties=False):
    idx = torch.stack([torch.stack([torch.randperm(d_sae)[:K] for _ in range(T)]) for _ in range(B)])
    idx[torch.rand(B, T, K) < 0.2] = -1
    acts = torch.rand(B, T, K)
    scores = torch.randn(B, T, K)
    if ties:  # few distinct values: the (doc, pos) tie-break decides
        scores = scores.round()
    scores[idx < 0] = 0
    inf = Influence(idx, acts, torch.zeros_like(acts), scores, d_sae)
    mask = torch.rand(B, T) < 0.85
    ids = torch.randint(0, 50, (B, T))
    return inf, mask, ids


def _brute(batches, d_sae, n):
    """For each latent, every offered (score, doc, pos, act, ctx-center token), sorted by the
    documented total order, first n."""
    per = {j: [] for j in range(d_sae)}
    for inf, mask, ids, docs, offs in batches:
        B, T, K = inf.indices.shape
        for b in range(B):
            for t in range(T):
                if not mask[b, t]:
                    continue
                for s in range(K):
                    j = int(inf.indices[b, t, s])
                    if j >= 0:
                        per[j].append((-float(inf.scores[b, t, s]), int(docs[b]), int(offs[b]) + t,
                                       float(inf.acts[b, t, s]), int(ids[b, t])))
    return {j: sorted(v)[:n] for j, v in per.items()}


def _brute_both(batches, d_sae, n, c):
    """Independent oracle for both sides and the windows: every per-token (act, score) of every
    latent as dense [T, d_sae] tables per row; each latent's offers sorted by (score desc, doc,
    pos) for the top and (score asc, doc, pos) among scores < 0 for the bottom, first n; each
    kept example's window read from the dense tables: (token, act, score) at positions
    pos-c..pos+c of its row that exist (attention mask 1)."""
    per = {j: [] for j in range(d_sae)}
    for inf, mask, ids, docs, offs in batches:
        B, T, K = inf.indices.shape
        for b in range(B):
            act = [[0.0] * d_sae for _ in range(T)]
            sco = [[0.0] * d_sae for _ in range(T)]
            for t in range(T):
                if not mask[b, t]:
                    continue
                for q in range(K):
                    j = int(inf.indices[b, t, q])
                    if j >= 0:
                        act[t][j] = float(torch.tensor(float(inf.acts[b, t, q]), dtype=torch.float32))
                        sco[t][j] = float(torch.tensor(float(inf.scores[b, t, q]), dtype=torch.float32))
            for t in range(T):
                if not mask[b, t]:
                    continue
                for q in range(K):
                    j = int(inf.indices[b, t, q])
                    if j < 0:
                        continue
                    win = [u for u in range(t - c, t + c + 1) if 0 <= u < T]
                    per[j].append((float(inf.scores[b, t, q]), int(docs[b]), int(offs[b]) + t,
                                   float(inf.acts[b, t, q]),
                                   [int(ids[b, u]) for u in win], [act[u][j] for u in win], [sco[u][j] for u in win],
                                   t - win[0]))
    top = {j: sorted(v, key=lambda e: (-e[0], e[1], e[2]))[:n] for j, v in per.items()}
    bottom = {j: sorted([e for e in v if e[0] < 0], key=lambda e: (e[0], e[1], e[2]))[:n] for j, v in per.items()}
    return top, bottom


def _feed(ex, batch):
    inf, mask, ids, docs, offs = batch
    ex.update(inf, mask, ids, torch.ones_like(ids), docs, offs)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rows_in_corpus_order", [False, True])
def test_matches_brute_force(ties, rows_in_corpus_order):
    # rows in corpus order (as make_batches builds them) take the one-sort path; rows in any
    # order the general (latent, score, doc, pos) sort
    d_sae, n, c = 24, 3, 2
    batches = []
    for i in range(5):
        inf, mask, ids = _random_batch(3, 6, 4, d_sae, ties)
        if rows_in_corpus_order:  # two windows of one document, then the next document
            docs = torch.tensor([2 * i, 2 * i, 2 * i + 1])
            offs = torch.tensor([0, 6, 0])
        else:
            docs = torch.tensor([3 * i + 2, 3 * i, 3 * i + 1])
            offs = torch.randint(0, 20, (3,))
        batches.append((inf, mask, ids, docs, offs))
    ex = TopExamples(d_sae, n, c)
    for b in batches:
        _feed(ex, b)
    want = _brute(batches, d_sae, n)
    for j in range(d_sae):
        rows = ex.rows(j)
        assert [(-r["score"], r["doc"], r["pos"], r["act"]) for r in rows] == [w[:4] for w in want[j]]
        assert [r["ctx"][r["center"]] for r in rows] == [w[4] for w in want[j]]
    empty = ex.doc < 0
    assert torch.isinf(ex.score[empty]).all() and (ex.ctx[empty] == -1).all()


def test_merge_is_order_independent():
    d_sae, n = 16, 4
    batches = []
    for i in range(8):
        inf, mask, ids = _random_batch(2, 5, 3, d_sae, ties=True)
        batches.append((inf, mask, ids, torch.tensor([2 * i, 2 * i + 1]), torch.zeros(2, dtype=torch.long)))
    whole = TopExamples(d_sae, n, 1)
    for b in batches:
        _feed(whole, b)
    for trial in range(3):
        order = list(range(len(batches)))
        random.Random(trial).shuffle(order)
        parts = [TopExamples(d_sae, n, 1) for _ in range(3)]
        for k, i in enumerate(order):
            _feed(parts[k % 3], batches[i])
        merged = TopExamples(d_sae, n, 1)
        for p in reversed(parts) if trial % 2 else parts:
            merged.merge(p)
        assert merged == whole
    rebuilt = TopExamples.from_dict(whole.to_dict())
    assert rebuilt == whole


def test_context_window():
    d_sae, c = 4, 2
    ids = torch.tensor([[10, 11, 12, 13, 14, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    idx = torch.tensor([[[0], [1], [-1], [2], [3], [-1], [-1]]])
    sc = torch.tensor([[[1.0], [2.0], [0.0], [3.0], [4.0], [0.0], [0.0]]])
    inf = Influence(idx, sc, sc, sc, d_sae)
    ex = TopExamples(d_sae, 1, c)
    ex.update(inf, am.bool(), ids, am, torch.tensor([7]), torch.tensor([100]))
    assert ex.ctx[0, 0].tolist() == [-1, -1, 10, 11, 12]
    assert ex.ctx[3, 0].tolist() == [12, 13, 14, -1, -1]  # padding is not context
    assert ex.pos[:, 0].tolist() == [100, 101, 103, 104] and (ex.doc[:, 0] == 7).all()
    assert ex.rows(3)[0]["ctx"] == [12, 13, 14] and ex.rows(3)[0]["center"] == 2


def test_bad_arguments():
    with pytest.raises(InputError, match="must be >= 1"):
        TopExamples(8, 0)
    a, b = TopExamples(8, 2), TopExamples(8, 3)
    with pytest.raises(InputError, match="cannot merge"):
        a.merge(b)


def _check_against_oracle(ex, batches, d_sae, n, c):
    top, bottom = _brute_both(batches, d_sae, n, c)
    for side, want in (("top", top), ("bottom", bottom)):
        for j in range(d_sae):
            rows = ex.rows(j, side)
            assert [(r["score"], r["doc"], r["pos"], r["act"]) for r in rows] == [w[:4] for w in want[j]], (side, j)
            assert [r["ctx"] for r in rows] == [w[4] for w in want[j]]
            assert [r["acts"] for r in rows] == [w[5] for w in want[j]]
            assert [r["scores"] for r in rows] == [w[6] for w in want[j]]
            assert [r["center"] for r in rows] == [w[7] for w in want[j]]
            # the centre of the window is the example itself
            assert all(r["scores"][r["center"]] == float(torch.tensor(r["score"], dtype=torch.float32))
                       for r in rows)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rows_in_corpus_order", [False, True])
def test_top_bottom_and_windows_match_dense_oracle(ties, rows_in_corpus_order):
    d_sae, n, c = 12, 3, 2
    batches = []
    for i in range(5):
        inf, mask, ids = _random_batch(3, 7, 4, d_sae, ties)
        if rows_in_corpus_order:
            docs, offs = torch.tensor([2 * i, 2 * i, 2 * i + 1]), torch.tensor([0, 7, 0])
        else:
            docs, offs = torch.tensor([3 * i + 2, 3 * i, 3 * i + 1]), torch.randint(0, 20, (3,))
        batches.append((inf, mask, ids, docs, offs))
    ex = TopExamples(d_sae, n, c)
    for b in batches:
        _feed(ex, b)
    _check_against_oracle(ex, batches, d_sae, n, c)
    assert bool((ex.bottom_score[ex.bottom_doc >= 0] < 0).all())
    empty = ex.bottom_doc < 0
    assert torch.isposinf(ex.bottom_score[empty]).all() and (ex.bottom_ctx[empty] == -1).all()
    assert (ex.bottom_ctx_score[empty] == 0).all() and (ex.bottom_ctx_act[empty] == 0).all()


def test_windows_with_padding_and_a_dense_float64_oracle():
    """Rows of unequal length (right padding): window values at the padded positions are
    absent, and equal the dense per-token scores elsewhere, float64 scores included."""
    d_sae, n, c, B, T, K = 10, 2, 3, 3, 8, 3
    lens = [8, 5, 2]
    am = torch.tensor([[1] * L + [0] * (T - L) for L in lens])
    dense_s = torch.randn(B, T, d_sae, dtype=torch.float64)
    dense_a = torch.rand(B, T, d_sae, dtype=torch.float64)
    idx = torch.stack([torch.stack([torch.randperm(d_sae)[:K] for _ in range(T)]) for _ in range(B)])
    idx[am == 0] = -1
    on = torch.zeros(B, T, d_sae, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for j in idx[b, t].tolist():
                if j >= 0:
                    on[b, t, j] = True
    dense_s, dense_a = dense_s * on, dense_a * on
    g = idx.clamp(min=0)
    inf = Influence(idx, dense_a.gather(-1, g) * (idx >= 0), torch.zeros(B, T, K, dtype=torch.float64),
                    dense_s.gather(-1, g) * (idx >= 0), d_sae)
    ids = torch.randint(0, 30, (B, T))
    ex = TopExamples(d_sae, n, c)
    ex.update(inf, am.bool(), ids, am, torch.tensor([4, 5, 6]), torch.zeros(B, dtype=torch.long))
    checked = 0
    for side in ("top", "bottom"):
        for j in range(d_sae):
            for r in ex.rows(j, side):
                b, t = r["doc"] - 4, r["pos"]
                lo, hi = max(0, t - c), min(lens[b], t + c + 1)
                assert r["ctx"] == ids[b, lo:hi].tolist() and r["center"] == t - lo
                assert r["scores"] == dense_s[b, lo:hi, j].to(torch.float32).tolist()
                assert r["acts"] == dense_a[b, lo:hi, j].to(torch.float32).tolist()
                checked += 1
    assert checked >= d_sae


def test_merge_keeps_both_sides_and_windows():
    d_sae, n, c = 10, 3, 1
    batches = []
    for i in range(6):
        inf, mask, ids = _random_batch(2, 5, 3, d_sae, ties=True)
        batches.append((inf, mask, ids, torch.tensor([2 * i, 2 * i + 1]), torch.zeros(2, dtype=torch.long)))
    parts = [TopExamples(d_sae, n, c) for _ in range(3)]
    for k, b in enumerate(reversed(batches)):
        _feed(parts[k % 3], b)
    merged = TopExamples(d_sae, n, c)
    for p in parts:
        merged.merge(TopExamples.from_dict(p.to_dict()))
    _check_against_oracle(merged, batches, d_sae, n, c)


def test_old_tables_without_bottom_are_refused():
    ex = TopExamples(4, 2, 1)
    d = {k: v for k, v in ex.to_dict().items() if "bottom" not in k}
    with pytest.raises(InputError, match="missing.*bottom_score.*score the corpus again"):
        TopExamples.from_dict(d)
    with pytest.raises(InputError, match="side must be"):
        ex.rows(0, "middle")
