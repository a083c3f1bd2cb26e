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
        self._offer(j, s, a, doc_ids.to(dev)[b], offsets.to(dev)[b] + t, ctx)
        return self

    def _offer(self, j, s, a, d, p, ctx) -> None:
        """Merge candidates (latent j, score s, act a, doc d, pos p, context) into the table."""
        if j.numel() == 0:
            return
        U = torch.unique(j)  # sorted
        n = self.n
        lat = torch.cat([U.repeat_interleave(n), j])
        sc = torch.cat([self.score[U].reshape(-1), s])
        ac = torch.cat([self.act[U].reshape(-1), a])
        dc = torch.cat([self.doc[U].reshape(-1), d])
        ps = torch.cat([self.pos[U].reshape(-1), p])
        cx = torch.cat([self.ctx[U].reshape(-1, self.ctx.shape[-1]), ctx.to(torch.int32)])
        order = _lexsort([lat, -sc, dc, ps])
        lat, sc, ac, dc, ps, cx = lat[order], sc[order], ac[order], dc[order], ps[order], cx[order]
        _, counts = torch.unique_consecutive(lat, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.arange(len(counts), device=lat.device).repeat_interleave(counts)
        rank = torch.arange(lat.numel(), device=lat.device) - starts.repeat_interleave(counts)
        sel = (rank < n) & torch.isfinite(sc)
        rows, cols = U[group[sel]], rank[sel]
        self.score[U] = float("-inf")
        self.act[U] = 0
        self.doc[U] = -1
        self.pos[U] = -1
        self.ctx[U] = -1
        self.score[rows, cols] = sc[sel]
        self.act[rows, cols] = ac[sel]
        self.doc[rows, cols] = dc[sel]
        self.pos[rows, cols] = ps[sel]
        self.ctx[rows, cols] = cx[sel]

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
