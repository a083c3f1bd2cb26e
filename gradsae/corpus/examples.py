"""The top-N and bottom-N examples of every latent by influence, kept in bounded memory.

Like max-activating examples, but ranked by influence score. For each latent the table keeps
two lists of token occurrences, each under one strict total order:

- **top**: the ``n`` highest scores (whatever their sign), ordered by
  score descending, then document id ascending, then position ascending;
- **bottom**: the ``n`` most negative scores (only scores < 0: a latent that never lowers Y
  has no bottom examples), ordered by score ascending, then document, then position.

Because each order is total (a latent occurs at most once per token), each kept set is the
best ``n`` of everything ever offered, whatever the order of the offers: merging the tables of
several ranks or resuming from a checkpoint gives exactly the table of one uninterrupted run.

Every example also keeps its context window, ``2 * context + 1`` tokens centred on it within
its sequence, and at every token of that window the activation and the influence score of the
example's latent there (0 where the latent is inactive or the position does not count), so a
viewer can shade the whole window.

Memory is fixed, ``2 * d_sae * n`` slots of (score, activation, doc, position, context tokens
and their per-token activations and scores); offers that cannot enter a latent's list are
dropped before any sorting, and windows are built only for the offers that are kept.
"""

from __future__ import annotations

import torch

from ..errors import InputError

SIDES = ("top", "bottom")
_SIDE_FIELDS = ("score", "act", "doc", "pos", "ctx", "ctx_act", "ctx_score")
_PREFIX = {"top": "", "bottom": "bottom_"}
_SIGN = {"top": 1.0, "bottom": -1.0}
FIELDS = tuple(_PREFIX[side] + f for side in SIDES for f in _SIDE_FIELDS)


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


class _Windows:
    """The context windows of a batch's candidates: token ids, and the activation and score
    of the candidate's latent at every token of the window (looked up in the batch's sparse
    influence through one sorted key array, built on first use)."""

    def __init__(self, inf, keep, input_ids, attention_mask, context, dev):
        self.inf, self.keep, self.c, self.dev = inf, keep, context, dev
        self.B, self.T, _ = keep.shape
        ids = torch.where(attention_mask.to(dev).bool(), input_ids.to(dev),
                          torch.full_like(input_ids, -1, device=dev))
        self.ids = torch.nn.functional.pad(ids, (context, context), value=-1).to(torch.int32)
        self._table = None

    def _lookup(self):
        if self._table is None:
            b, t, s = self.keep.nonzero(as_tuple=True)
            j = self.inf.indices.to(self.dev)[b, t, s]
            key = ((b * self.T + t) * self.inf.d_sae + j).to(torch.int64)
            order = key.argsort()
            acts = self.inf.acts.to(self.dev)[b, t, s][order].to(torch.float32)
            scores = self.inf.scores.to(self.dev)[b, t, s][order].to(torch.float32)
            self._table = (key[order], acts, scores)
        return self._table

    def __call__(self, b, t, j):
        """``(ctx [M, W] int32, ctx_act [M, W] float32, ctx_score [M, W] float32)``."""
        W = 2 * self.c + 1
        win = t.unsqueeze(1) + torch.arange(W, device=self.dev)  # in padded coordinates
        ctx = self.ids[b.unsqueeze(1), win]
        keys, acts, scores = self._lookup()
        tp = win - self.c
        inside = (ctx >= 0) & (tp >= 0) & (tp < self.T)
        q = (b.unsqueeze(1) * self.T + tp.clamp(0, self.T - 1)) * self.inf.d_sae + j.unsqueeze(1)
        if keys.numel() == 0:
            z = torch.zeros(ctx.shape, dtype=torch.float32, device=self.dev)
            return ctx, z, z.clone()
        at = torch.searchsorted(keys, q.reshape(-1)).clamp(max=keys.numel() - 1).reshape(q.shape)
        found = inside & (keys[at] == q)
        zero = torch.zeros((), dtype=torch.float32, device=self.dev)
        return ctx, torch.where(found, acts[at], zero), torch.where(found, scores[at], zero)


class TopExamples:
    """Per-latent top-``n`` and bottom-``n`` examples by influence (see module docstring).

    Tables, all ``[d_sae, n]``, best first (``ctx``, ``ctx_act``, ``ctx_score``:
    ``[d_sae, n, 2 * context + 1]``). Top: ``score`` (float64, -inf = empty slot), ``act``
    (float64), ``doc`` (int64, -1 = empty), ``pos`` (int64, token position in the document),
    ``ctx`` (int32 token ids around the position, -1 outside the sequence), ``ctx_act`` and
    ``ctx_score`` (float32, the latent's activation and score at each token of ``ctx``, 0
    where it is inactive or outside). Bottom: the same fields prefixed ``bottom_``
    (``bottom_score`` +inf = empty slot).
    """

    def __init__(self, d_sae: int, n: int = 10, context: int = 8, device: torch.device | str = "cpu"):
        if n < 1:
            raise InputError(f"the number of top examples must be >= 1, got {n}")
        if context < 0:
            raise InputError(f"context must be >= 0, got {context}")
        self.d_sae, self.n, self.context = int(d_sae), int(n), int(context)
        W = 2 * context + 1
        for side in SIDES:
            p = _PREFIX[side]
            setattr(self, p + "score", torch.full((d_sae, n), -_SIGN[side] * float("inf"), dtype=torch.float64,
                                                  device=device))
            setattr(self, p + "act", torch.zeros((d_sae, n), dtype=torch.float64, device=device))
            setattr(self, p + "doc", torch.full((d_sae, n), -1, dtype=torch.int64, device=device))
            setattr(self, p + "pos", torch.full((d_sae, n), -1, dtype=torch.int64, device=device))
            setattr(self, p + "ctx", torch.full((d_sae, n, W), -1, dtype=torch.int32, device=device))
            setattr(self, p + "ctx_act", torch.zeros((d_sae, n, W), dtype=torch.float32, device=device))
            setattr(self, p + "ctx_score", torch.zeros((d_sae, n, W), dtype=torch.float32, device=device))

    @property
    def device(self) -> torch.device:
        return self.score.device

    def _field(self, side: str, f: str) -> torch.Tensor:
        return getattr(self, _PREFIX[side] + f)

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
        wanted = {"top": s >= self.score[:, -1][j],
                  "bottom": (s < 0) & (s <= self.bottom_score[:, -1][j])}
        if not any(bool(w.any()) for w in wanted.values()):
            return self
        b_all, t_all, _ = keep.nonzero(as_tuple=True)
        a_all = inf.acts.to(dev, torch.float64)[keep]
        windows = _Windows(inf, keep, input_ids, attention_mask, self.context, dev)
        # Rows of a batch from make_batches run forward through the corpus, so the candidates,
        # in (row, position) order, are already sorted by (doc, pos): one sort by (latent,
        # score) then gives the full order. Checked, not assumed.
        docs, offs = doc_ids.to(dev), offsets.to(dev)
        start = docs * _DOC_STRIDE + offs
        in_order = bool((start[1:] >= start[:-1] + mask.shape[1]).all()) if len(start) > 1 else True
        exact32 = inf.scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for side, good in wanted.items():
            if not bool(good.any()):
                continue
            b, t, jj = b_all[good], t_all[good], j[good]
            self._offer(side, jj, s[good], a_all[good], docs[b], offs[b] + t,
                        lambda sel, b=b, t=t, jj=jj: windows(b[sel], t[sel], jj[sel]),
                        dp_sorted=in_order and exact32)
        return self

    def _offer(self, side, j, s, a, d, p, windows, dp_sorted: bool = False) -> None:
        """Merge candidates (latent j, score s, act a, doc d, pos p) into one side's table;
        ``windows(sel)`` gives ``(ctx, ctx_act, ctx_score)`` of the candidates ``sel``.

        Candidates are ranked by ``key = sign * score`` (the bottom side ranks negated
        scores), grouped by latent and cut to their best ``n`` (one sort of the candidates
        only); each touched latent's row is then merged with its ``n`` kept entries by
        sorting ``[rows, 2n]`` along the last dimension; windows are built last, only for the
        candidates that entered the table. ``dp_sorted``: the candidates come
        in (doc, pos) order and their scores are float32 values, so one stable sort by a
        packed (latent, key) key orders them."""
        if j.numel() == 0:
            return
        n, dev, sign = self.n, self.device, _SIGN[side]
        F = {f: self._field(side, f) for f in _SIDE_FIELDS}
        k = s * sign
        dp = d * _DOC_STRIDE + p  # (doc, pos) as one int64 tie-break key
        if dp_sorted:
            order = _packed_key(j, k).argsort(stable=True)
        else:
            order = _lexsort([j, -k, dp])
        js = j[order]
        U, counts = torch.unique_consecutive(js, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.arange(len(U), device=dev).repeat_interleave(counts)
        rank = torch.arange(js.numel(), device=dev) - starts.repeat_interleave(counts)
        keep = rank < n
        g, r = group[keep], rank[keep]
        sel = order[keep]  # the kept candidates, in table order
        k, a, dp, d, p = k[sel], a[sel], dp[sel], d[sel], p[sel]
        # [U, 2n] rows: the kept entries, then the candidates; empty slots sort last
        R = len(U)
        sc = torch.cat([F["score"][U] * sign, torch.full((R, n), float("-inf"), dtype=torch.float64, device=dev)], 1)
        src = torch.cat([torch.arange(R * n, device=dev).reshape(R, n), torch.full((R, n), -1, device=dev)], 1)
        sc[g, n + r] = k
        src[g, n + r] = R * n + torch.arange(k.numel(), device=dev)
        o = (-sc).argsort(dim=1, stable=True)
        top = sc.gather(1, o)
        if bool(((top[:, 1:] == top[:, :-1]) & torch.isfinite(top[:, 1:])).any()):
            # equal scores in a row: order by (doc, pos) first, then (stably) by score
            big = torch.iinfo(torch.int64).max
            key = torch.cat([torch.where(F["doc"][U] >= 0, F["doc"][U] * _DOC_STRIDE + F["pos"][U],
                                         torch.full_like(F["pos"][U], big)),
                             torch.full((R, n), big, dtype=torch.int64, device=dev)], 1)
            key[g, n + r] = dp
            o = key.argsort(dim=1, stable=True)
            o = o.gather(1, (-sc.gather(1, o)).argsort(dim=1, stable=True))
        o = o[:, :n]
        sc, src = sc.gather(1, o), src.gather(1, o)
        # empty slots point at a sentinel entry appended to every pool
        src = torch.where(torch.isfinite(sc), src, torch.full_like(src, R * n + k.numel()))

        def pool(old, new, empty, src=src):
            sentinel = torch.full((1, *old.shape[2:]), empty, dtype=old.dtype, device=dev)
            return torch.cat([old[U].reshape(R * n, *old.shape[2:]), new.to(old.dtype), sentinel])[src]

        F["score"][U] = pool(F["score"], k * sign, -sign * float("inf"))
        F["act"][U] = pool(F["act"], a, 0.0)
        F["doc"][U] = pool(F["doc"], d, -1)
        F["pos"][U] = pool(F["pos"], p, -1)
        # windows only for the candidates that made it into the table
        new = (src >= R * n) & (src < R * n + k.numel())
        used = src[new] - R * n
        ctx, ctx_act, ctx_score = windows(sel[used])
        src_w = torch.where(src >= R * n, torch.full_like(src, R * n + used.numel()), src)
        src_w[new] = R * n + torch.arange(used.numel(), device=dev)
        F["ctx"][U] = pool(F["ctx"], ctx, -1, src_w)
        F["ctx_act"][U] = pool(F["ctx_act"], ctx_act, 0.0, src_w)
        F["ctx_score"][U] = pool(F["ctx_score"], ctx_score, 0.0, src_w)

    def merge(self, other: "TopExamples") -> "TopExamples":
        """Fold ``other``'s examples (both sides) into this table (in place); returns self."""
        if (other.d_sae, other.n, other.context) != (self.d_sae, self.n, self.context):
            raise InputError(
                f"cannot merge top examples (d_sae, n, context)={(other.d_sae, other.n, other.context)} "
                f"into {(self.d_sae, self.n, self.context)}"
            )
        dev = self.device
        for side in SIDES:
            O = {f: other._field(side, f).to(dev) for f in _SIDE_FIELDS}
            full = O["doc"] >= 0
            if bool(full.any()):
                rows = full.nonzero(as_tuple=True)[0]
                ctx, ca, cs = O["ctx"][full], O["ctx_act"][full], O["ctx_score"][full]
                self._offer(side, rows, O["score"][full], O["act"][full], O["doc"][full], O["pos"][full],
                            lambda sel, ctx=ctx, ca=ca, cs=cs: (ctx[sel], ca[sel], cs[sel]))
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
        missing = [f for f in FIELDS if prefix + f not in d]
        if missing:
            raise InputError(f"top-example tables are missing {', '.join(missing)} (written by a gradsae "
                             "without bottom examples and per-token windows; score the corpus again)")
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

    def rows(self, latent: int, side: str = "top") -> list[dict]:
        """The kept examples of one latent, best first (``side="bottom"``: the most negative
        first): dicts with doc, pos, score, act, ctx (token ids, -1 removed), ``acts`` and
        ``scores`` (the latent's activation and score at each token of ctx) and ``center``
        (index of the example's token in ctx)."""
        if side not in SIDES:
            raise InputError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        F = {f: self._field(side, f)[latent] for f in _SIDE_FIELDS}
        out = []
        for r in range(self.n):
            if int(F["doc"][r]) < 0:
                break
            ctx = F["ctx"][r].tolist()
            inside = [x >= 0 for x in ctx]
            left = sum(1 for x in ctx[: self.context] if x < 0)
            out.append({
                "doc": int(F["doc"][r]), "pos": int(F["pos"][r]),
                "score": float(F["score"][r]), "act": float(F["act"][r]),
                "ctx": [x for x in ctx if x >= 0],
                "acts": [v for v, i in zip(F["ctx_act"][r].tolist(), inside) if i],
                "scores": [v for v, i in zip(F["ctx_score"][r].tolist(), inside) if i],
                "center": self.context - left,
            })
        return out

    def __repr__(self) -> str:
        return (f"TopExamples(d_sae={self.d_sae}, n={self.n}, context={self.context}, "
                f"filled={int((self.doc >= 0).sum())}, bottom={int((self.bottom_doc >= 0).sum())})")
