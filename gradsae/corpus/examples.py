"""The top-N examples of every latent by influence, kept in bounded memory.

Like max-activating examples, but ranked by influence score. For each latent the table keeps
the ``n`` best token occurrences under one strict total order:

    score descending, then document id ascending, then position ascending

Because the order is total (a latent occurs at most once per token), the kept set is the top
``n`` of everything ever offered, whatever the order of the offers: merging the tables of
several ranks or resuming from a checkpoint gives exactly the table of one uninterrupted run.

Memory is fixed, ``d_sae * n`` slots of (score, activation, doc, position, context tokens);
offers below a latent's current ``n``-th score are dropped before any sorting.
"""

from __future__ import annotations

import torch

from ..errors import InputError

FIELDS = ("score", "act", "doc", "pos", "ctx")


_DOC_STRIDE = 1 << 31  # (doc, pos) -> doc * 2^31 + pos: documents < 2^32, positions < 2^31


def _packed_key(j: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by latent ascending, then score descending, for float32-exact
    scores: the float32 bits of -score mapped to an order-preserving unsigned 32-bit value."""
    ns = (-s).to(torch.float32) + 0.0  # + 0.0: -0.0 becomes 0.0, as equal as they compare
    bits = ns.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # monotone in ns, 0..2^32-1
    return j.to(torch.int64) * (1 << 32) + ordered


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by ``keys[0]``, ties by ``keys[1]``, ... (all ascending)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for k in reversed(keys):
        order = order[k[order].argsort(stable=True)]
    return order


class TopExamples:
    """Per-latent top-``n`` examples by influence (see module docstring).

    Tables, all ``[d_sae, n]`` (``ctx``: ``[d_sae, n, 2 * context + 1]``), best first:
    ``score`` (float64, -inf = empty slot), ``act`` (float64), ``doc`` (int64, -1 = empty),
    ``pos`` (int64, token position in the document), ``ctx`` (int32 token ids around the
    position, -1 outside the sequence).
    """

    def __init__(self, d_sae: int, n: int = 10, context: int = 8, device: torch.device | str = "cpu"):
        if n < 1:
            raise InputError(f"the number of top examples must be >= 1, got {n}")
        if context < 0:
            raise InputError(f"context must be >= 0, got {context}")
        self.d_sae, self.n, self.context = int(d_sae), int(n), int(context)
        self.score = torch.full((d_sae, n), float("-inf"), dtype=torch.float64, device=device)
        self.act = torch.zeros((d_sae, n), dtype=torch.float64, device=device)
        self.doc = torch.full((d_sae, n), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((d_sae, n), -1, dtype=torch.int64, device=device)
        self.ctx = torch.full((d_sae, n, 2 * context + 1), -1, dtype=torch.int32, device=device)

    @property
    def device(self) -> torch.device:
        return self.score.device

    # ------------------------------------------------------------------ accumulation
    def update(self, inf, mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               doc_ids: torch.Tensor, offsets: torch.Tensor) -> "TopExamples":
        """Offer every active latent of a batch.

        Args:
            inf: :class:`gradsae.Influence` of shape ``[B, T, K]``.
            mask: ``[B, T]`` bool, the positions that count.
            input_ids, attention_mask: ``[B, T]``, for the context windows.
            doc_ids, offsets: ``[B]``; row b, column t is token ``offsets[b] + t`` of
                document ``doc_ids[b]``.
        """
        if inf.d_sae != self.d_sae:
            raise InputError(f"Influence has d_sae={inf.d_sae} but this table has d_sae={self.d_sae}")
        dev = self.device
        idx = inf.indices.to(dev)
        scores = inf.scores.to(dev, torch.float64)
        keep = (idx >= 0) & mask.to(dev, torch.bool).unsqueeze(-1) & torch.isfinite(scores)
        j = idx[keep]
        s = scores[keep]
        thr = self.score[:, -1]
        good = s >= thr[j]
        if not bool(good.any()):
            return self
        b, t, _ = keep.nonzero(as_tuple=True)
        b, t, j, s = b[good], t[good], j[good], s[good]
        a = inf.acts.to(dev, torch.float64)[keep][good]
        c = self.context
        ids = torch.where(attention_mask.to(dev).bool(), input_ids.to(dev), torch.full_like(input_ids, -1, device=dev))
        ids = torch.nn.functional.pad(ids, (c, c), value=-1).to(torch.int32)
        win = t.unsqueeze(1) + torch.arange(2 * c + 1, device=dev)
        ctx = ids[b.unsqueeze(1), win]
        # Rows of a batch from make_batches run forward through the corpus, so the candidates,
        # in (row, position) order, are already sorted by (doc, pos): one sort by (latent,
        # score) then gives the full order. Checked, not assumed.
        docs, offs = doc_ids.to(dev), offsets.to(dev)
        start = docs * _DOC_STRIDE + offs
        in_order = bool((start[1:] >= start[:-1] + mask.shape[1]).all()) if len(start) > 1 else True
        exact32 = inf.scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
        self._offer(j, s, a, docs[b], offs[b] + t, ctx, dp_sorted=in_order and exact32)
        return self

    def _offer(self, j, s, a, d, p, ctx, dp_sorted: bool = False) -> None:
        """Merge candidates (latent j, score s, act a, doc d, pos p, context) into the table.

        Candidates are grouped by latent and cut to their best ``n`` (one sort of the
        candidates only); each touched latent's row is then merged with its ``n`` kept
        entries by sorting ``[rows, 2n]`` along the last dimension. ``dp_sorted``: the
        candidates come in (doc, pos) order and their scores are float32 values, so one
        stable sort by a packed (latent, score) key orders them."""
        if j.numel() == 0:
            return
        n, dev = self.n, self.device
        dp = d * _DOC_STRIDE + p  # (doc, pos) as one int64 tie-break key
        if dp_sorted:
            order = _packed_key(j, s).argsort(stable=True)
        else:
            order = _lexsort([j, -s, dp])
        js = j[order]
        U, counts = torch.unique_consecutive(js, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.arange(len(U), device=dev).repeat_interleave(counts)
        rank = torch.arange(js.numel(), device=dev) - starts.repeat_interleave(counts)
        keep = rank < n
        g, r = group[keep], rank[keep]
        sel = order[keep]  # the kept candidates, in table order
        s, a, dp, d, p, ctx = s[sel], a[sel], dp[sel], d[sel], p[sel], ctx[sel]
        # [U, 2n] rows: the kept entries, then the candidates; empty slots sort last
        R = len(U)
        sc = torch.cat([self.score[U], torch.full((R, n), float("-inf"), dtype=torch.float64, device=dev)], 1)
        src = torch.cat([torch.arange(R * n, device=dev).reshape(R, n), torch.full((R, n), -1, device=dev)], 1)
        sc[g, n + r] = s
        src[g, n + r] = R * n + torch.arange(s.numel(), device=dev)
        o = (-sc).argsort(dim=1, stable=True)
        top = sc.gather(1, o)
        if bool(((top[:, 1:] == top[:, :-1]) & torch.isfinite(top[:, 1:])).any()):
            # equal scores in a row: order by (doc, pos) first, then (stably) by score
            big = torch.iinfo(torch.int64).max
            key = torch.cat([torch.where(self.doc[U] >= 0, self.doc[U] * _DOC_STRIDE + self.pos[U],
                                         torch.full_like(self.pos[U], big)),
                             torch.full((R, n), big, dtype=torch.int64, device=dev)], 1)
            key[g, n + r] = dp
            o = key.argsort(dim=1, stable=True)
            o = o.gather(1, (-sc.gather(1, o)).argsort(dim=1, stable=True))
        o = o[:, :n]
        sc, src = sc.gather(1, o), src.gather(1, o)
        # empty slots point at a sentinel entry appended to every pool
        src = torch.where(torch.isfinite(sc), src, torch.full_like(src, R * n + s.numel()))

        def pool(old, new, empty):
            sentinel = torch.full((1, *old.shape[2:]), empty, dtype=old.dtype, device=dev)
            return torch.cat([old[U].reshape(R * n, *old.shape[2:]), new.to(old.dtype), sentinel])[src]

        self.score[U] = pool(self.score, s, float("-inf"))
        self.act[U] = pool(self.act, a, 0.0)
        self.doc[U] = pool(self.doc, d, -1)
        self.pos[U] = pool(self.pos, p, -1)
        self.ctx[U] = pool(self.ctx, ctx, -1)

    def merge(self, other: "TopExamples") -> "TopExamples":
        """Fold ``other``'s examples into this table (in place); returns self."""
        if (other.d_sae, other.n, other.context) != (self.d_sae, self.n, self.context):
            raise InputError(
                f"cannot merge top examples (d_sae, n, context)={(other.d_sae, other.n, other.context)} "
                f"into {(self.d_sae, self.n, self.context)}"
            )
        full = other.doc >= 0
        if bool(full.any()):
            rows = full.nonzero(as_tuple=True)[0].to(self.device)
            f = full.to(self.device)
            self._offer(rows, other.score.to(self.device)[f], other.act.to(self.device)[f],
                        other.doc.to(self.device)[f], other.pos.to(self.device)[f], other.ctx.to(self.device)[f])
        return self

    # ------------------------------------------------------------------ I/O
    def to_dict(self, prefix: str = "examples.") -> dict[str, torch.Tensor]:
        """The tables, keyed ``prefix + field`` (for safetensors)."""
        return {prefix + f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "examples.", device="cpu") -> "TopExamples":
        """Rebuild from :meth:`to_dict` output."""
        try:
            score, ctx = d[prefix + "score"], d[prefix + "ctx"]
        except KeyError as e:
            raise InputError(f"top-example tables are missing {e}") from None
        d_sae, n = score.shape
        out = cls(d_sae, n, (ctx.shape[-1] - 1) // 2, device=device)
        for f in FIELDS:
            t = d[prefix + f]
            if t.shape != getattr(out, f).shape:
                raise InputError(f"top-example table {f} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(getattr(out, f).shape)}")
            setattr(out, f, t.to(device=device, dtype=getattr(out, f).dtype))
        return out

    def __eq__(self, other) -> bool:  # exact equality, for tests and resume checks
        return isinstance(other, TopExamples) and all(
            torch.equal(getattr(self, f).cpu(), getattr(other, f).cpu()) for f in FIELDS)

    def rows(self, latent: int) -> list[dict]:
        """The kept examples of one latent, best first: dicts with doc, pos, score, act,
        ctx (token ids, -1 removed) and ``center`` (index of the example's token in ctx)."""
        out = []
        for r in range(self.n):
            if int(self.doc[latent, r]) < 0:
                break
            ctx = self.ctx[latent, r].tolist()
            left = sum(1 for x in ctx[: self.context] if x < 0)
            out.append({
                "doc": int(self.doc[latent, r]), "pos": int(self.pos[latent, r]),
                "score": float(self.score[latent, r]), "act": float(self.act[latent, r]),
                "ctx": [x for x in ctx if x >= 0], "center": self.context - left,
            })
        return out

    def __repr__(self) -> str:
        return f"TopExamples(d_sae={self.d_sae}, n={self.n}, context={self.context}, filled={int((self.doc >= 0).sum())})"
