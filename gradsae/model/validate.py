"""Can the first-order score be trusted on this model? First-order vs integrated gradients vs
exact zero-ablation, on a set of prompts.

    v = scorer.validate(prompts, K=10)          # a Validation
    print(v.table()); v.write("validate_out")   # validate.csv, validate.json, validate.png

For each prompt, the candidates are its active latents (at most ``budget`` of them, those with
the largest first-order ``|score|``). Each candidate gets three whole-prompt numbers, all
estimating (or measuring) ``Y(clean) - Y(latent zeroed at every position)``:

- ``grad``: the first-order score summed over positions (``sum_t z[t, j] * dY/dz[t, j]``);
- ``ig``: integrated gradients from zero with ``steps`` steps, summed over positions;
- ``exact``: the measured change of Y when the latent is zeroed at every position.

Across all (prompt, candidate) pairs: Pearson and Spearman correlation and sign agreement of
each pair of methods; per prompt: the overlap of the K highest-scoring candidates by each
method (the share of the K found by both), averaged over prompts.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from .methods import DEFAULT_STEPS, ablation_effects, objective_kwargs

NAMES = ("grad", "ig", "exact")
PAIRS = (("grad", "exact"), ("ig", "exact"), ("grad", "ig"))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(v)
    r[order] = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    uniq, inv = torch.unique(v, return_inverse=True)
    if uniq.numel() < v.numel():
        s = torch.zeros_like(uniq).scatter_add_(0, inv, r)
        c = torch.zeros_like(uniq).scatter_add_(0, inv, torch.ones_like(r))
        r = (s / c)[inv]
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two vectors (NaN when one is constant or has < 2 entries)."""
    a, b = a.double(), b.double()
    if a.numel() < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    return pearson(_ranks(a.double()), _ranks(b.double()))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, K: int) -> float:
    """``|TopK(a) ∩ TopK(b)| / min(K, n)`` over the same candidates (highest values first; NaN
    without candidates)."""
    n = min(K, a.numel())
    if n == 0:
        return math.nan
    ta = set(torch.topk(a.double(), n).indices.tolist())
    tb = set(torch.topk(b.double(), n).indices.tolist())
    return len(ta & tb) / n


@dataclass
class Validation:
    """The result of :func:`validate`: ``rows`` (one dict per prompt and candidate latent:
    ``prompt``, ``latent``, ``grad``, ``ig``, ``exact``), ``summary`` (per pair of methods
    ``"grad~exact"`` ...: ``pearson``, ``spearman``, ``sign_agreement``, ``topk_overlap``,
    ``n``), the settings and the wall time in ``seconds``."""

    K: int
    steps: int
    budget: int | None
    n_prompts: int
    objective: str
    mode: str
    rows: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """The summary as a text table."""
        head = f"{'methods':<13}{'pearson':>9}{'spearman':>10}{'sign agr.':>11}{f'top-{self.K} overlap':>16}"
        lines = [f"{len(self.rows)} latents of {self.n_prompts} prompts (Y: {self.objective}, {self.mode} mode; "
                 f"ig: {self.steps} steps; exact: zero-ablation at every position)", head, "-" * len(head)]
        f = lambda v, w: f"{'nan':>{w}}" if v is None or math.isnan(v) else f"{v:>{w}.3f}"  # noqa: E731
        for pair in PAIRS:
            s = self.summary[f"{pair[0]}~{pair[1]}"]
            lines.append(f"{pair[0] + ' vs ' + pair[1]:<13}{f(s['pearson'], 9)}{f(s['spearman'], 10)}"
                         f"{f(s['sign_agreement'], 11)}{f(s['topk_overlap'], 16)}")
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"K": self.K, "steps": self.steps, "budget": self.budget, "n_prompts": self.n_prompts,
                "objective": self.objective, "mode": self.mode, "seconds": self.seconds,
                "summary": self.summary, "rows": self.rows}

    def write(self, out, plot: bool = True) -> dict:
        """Write ``validate.csv`` (the rows), ``validate.json`` (everything) and, with
        matplotlib, ``validate.png`` (scatter of grad and ig against exact) into the directory
        ``out`` (created). Returns ``{"csv", "json", "png"}`` paths (``png`` None without
        matplotlib)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "validate.csv", "json": out / "validate.json", "png": None}
        with open(paths["csv"], "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["prompt", "latent", *NAMES])
            w.writeheader()
            w.writerows(self.rows)
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))
        if plot:
            paths["png"] = self.plot(out / "validate.png")
        return paths

    def plot(self, path) -> Path | None:
        """Scatter plots of the first-order and IG scores against the exact effects; None (and
        nothing written) when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        ex = [r["exact"] for r in self.rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, name in zip(axes, ("grad", "ig")):
            v = [r[name] for r in self.rows]
            ax.scatter(ex, v, s=8, alpha=0.6)
            lo, hi = min(ex + v, default=0.0), max(ex + v, default=1.0)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            s = self.summary[f"{name}~exact"]
            ax.set_title(f"{name} vs exact: pearson {s['pearson']:.3f}, spearman {s['spearman']:.3f}")
            ax.set_xlabel("exact: Y(clean) - Y(latent zeroed)")
            ax.set_ylabel(f"{name} (sum over positions)")
        fig.suptitle(f"{len(self.rows)} latents of {self.n_prompts} prompts ({self.objective}, {self.mode} mode)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def validate(scorer, prompts, K: int = 10, steps: int = DEFAULT_STEPS, budget: int | None = 64,
             objective="predicted_prob", position: int = -1, batch_size: int = 16, **objective_kw) -> Validation:
    """First-order vs integrated gradients vs exact zero-ablation on ``prompts`` (texts, or a
    list of token-id lists); see the module docstring. ``K``: the Top-K of the overlap;
    ``budget``: candidates (ablations) per prompt, None: every active latent; ``batch_size``:
    prompts per forward of the first-order and IG passes."""
    for name, v, lo in (("K", K, 1), ("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise InputError(f"budget must be an int >= 1 or None, got {budget!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("validate needs at least one prompt")
    t0 = time.perf_counter()
    res = Validation(K, steps, budget, len(prompts), objective if isinstance(objective, str) else "callable",
                     scorer.mode)
    cols = {n: [] for n in NAMES}
    overlaps = {f"{a}~{b}": [] for a, b in PAIRS}
    kw = objective_kwargs(objective_kw)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        ids, mask = scorer.encode_batch(chunk)
        g = scorer.reduce(scorer.attribute(ids, mask, objective, position, error_node=False, **kw), "sum", "signed")
        ig = scorer.reduce(scorer.attribute(ids, mask, objective, position, method="ig", steps=steps, **kw),
                           "sum", "signed")
        lists = []
        for p in g:
            cand = torch.nonzero(p.active).flatten()
            order = torch.argsort(p.scores[cand].abs(), descending=True, stable=True)
            cand = cand[order]
            lists.append((cand if budget is None else cand[:budget]).tolist())
        _, effects = ablation_effects(scorer, ids, mask, lists, objective, position, kw)
        for b, lat in enumerate(lists):
            j = torch.tensor(lat, dtype=torch.long)
            vals = {"grad": g[b].scores[j].double(), "ig": ig[b].scores[j].double(), "exact": effects[b].double()}
            for n in NAMES:
                cols[n].append(vals[n])
            for a, bb in PAIRS:
                overlaps[f"{a}~{bb}"].append(topk_overlap(vals[a], vals[bb], K))
            for i, latent in enumerate(lat):
                res.rows.append({"prompt": s + b, "latent": int(latent),
                                 **{n: float(vals[n][i]) for n in NAMES}})
    allv = {n: torch.cat(cols[n]) if cols[n] else torch.zeros(0, dtype=torch.float64) for n in NAMES}
    for a, b in PAIRS:
        va, vb = allv[a], allv[b]
        ov = [o for o in overlaps[f"{a}~{b}"] if not math.isnan(o)]
        res.summary[f"{a}~{b}"] = {
            "pearson": pearson(va, vb), "spearman": spearman(va, vb),
            "sign_agreement": float((torch.sign(va) == torch.sign(vb)).double().mean()) if va.numel() else math.nan,
            "topk_overlap": sum(ov) / len(ov) if ov else math.nan, "n": int(va.numel()),
        }
    res.seconds = time.perf_counter() - t0
    return res
