"""Documents to model batches: tokenise, cut long documents, pack by a token budget.

The batch sequence is a pure function of the corpus, the tokenizer and these options, and
every batch starts at a :class:`Cursor` ``(doc, window)``. Restarting :func:`make_batches` at
the cursor of batch ``i`` yields exactly batches ``i, i+1, ...`` again: this is what makes
resume and multi-process runs reproduce a single uninterrupted run bit for bit.

Packing is greedy and in corpus order: a batch takes sequences while
``len(batch) * longest <= batch_tokens`` (a single longer sequence still forms a batch), and
is right-padded with ``attention_mask`` 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from ..errors import InputError
from .data import Corpus

LONG_MODES = ("window", "truncate")
_TOKENIZE_CHUNK = 64


class Cursor(NamedTuple):
    """Where a batch starts: record ``doc`` of the corpus, window ``window`` of it."""

    doc: int
    window: int


@dataclass
class Sequence:
    """A piece of one document: tokens ``ids`` starting at token ``offset`` of doc ``doc``."""

    doc: int
    window: int
    offset: int
    ids: list


@dataclass
class Batch:
    """A padded batch. ``doc_ids``/``offsets`` ``[B]`` map row b, column t to token
    ``offsets[b] + t`` of record ``doc_ids[b]``."""

    index: int
    start: Cursor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor
    offsets: torch.Tensor
    new_docs: int  # documents whose first window is in this batch

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return [list(x) for x in out]


def sequences(corpus: Corpus, tokenizer, max_length: int, long: str = "window", start: Cursor = Cursor(0, 0),
              min_length: int = 1) -> Iterator[Sequence]:
    """Token sequences of at most ``max_length`` tokens in corpus order, from ``start`` on.

    ``long="window"`` cuts a long document into consecutive non-overlapping windows;
    ``"truncate"`` keeps its first ``max_length`` tokens. Empty documents (nothing but
    whitespace, or no tokens) are skipped, and so are sequences shorter than ``min_length``
    (the next-token loss needs 2 tokens).
    """
    if long not in LONG_MODES:
        raise InputError(f"long must be one of {LONG_MODES}, got {long!r}")
    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    pending: list[tuple[int, str]] = []

    def flush():
        texts = [t for _, t in pending]
        toks = _tokenize(tokenizer, texts) if texts else []
        for (doc, _), ids in zip(pending, toks):
            if not ids:
                continue
            n_win = 1 if long == "truncate" else -(-len(ids) // max_length)
            w0 = start.window if doc == start.doc else 0
            for w in range(w0, n_win):
                piece = ids[w * max_length:(w + 1) * max_length]
                if len(piece) >= min_length:
                    yield Sequence(doc, w, w * max_length, piece)
        pending.clear()

    for doc, text in corpus.records(start.doc):
        if not text.strip():
            continue
        pending.append((doc, text))
        if len(pending) >= _TOKENIZE_CHUNK:
            yield from flush()
    yield from flush()


def make_batches(corpus: Corpus, tokenizer, *, max_length: int, batch_tokens: int, long: str = "window",
                 start: Cursor = Cursor(0, 0), first_index: int = 0, pad_id: int = 0,
                 min_length: int = 1) -> Iterator[Batch]:
    """Batches of :func:`sequences` packed by ``batch_tokens`` (padded tokens per batch).
    Indices count on from ``first_index``; ``start`` must be the start cursor of that batch."""
    if batch_tokens < 1:
        raise InputError(f"batch_tokens must be >= 1, got {batch_tokens}")
    index = first_index
    group: list[Sequence] = []
    longest = 0

    def build(seqs: list[Sequence], i: int) -> Batch:
        T = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            mask[b, : len(s.ids)] = 1
        return Batch(
            index=i,
            start=Cursor(seqs[0].doc, seqs[0].window),
            input_ids=ids,
            attention_mask=mask,
            doc_ids=torch.tensor([s.doc for s in seqs], dtype=torch.long),
            offsets=torch.tensor([s.offset for s in seqs], dtype=torch.long),
            new_docs=sum(1 for s in seqs if s.window == 0),
        )

    for s in sequences(corpus, tokenizer, max_length, long, start, min_length):
        new_longest = max(longest, len(s.ids))
        if group and (len(group) + 1) * new_longest > batch_tokens:
            yield build(group, index)
            index += 1
            group, new_longest = [], len(s.ids)
        group.append(s)
        longest = new_longest
    if group:
        yield build(group, index)
