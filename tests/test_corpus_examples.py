"""TopExamples: the top-N examples per latent against a brute-force sort, order independence,
and context windows."""

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
