"""The output directory of a corpus run.

    stats.safetensors     LatentStats.save (per-latent sums, counts, max; tokens)
    examples.safetensors  the raw top-example tables (TopExamples.to_dict)
    latents.parquet       one row per latent: statistics + top examples with decoded context
    report.png            influence vs activation frequency, score histogram, top latents
    meta.json             model, SAE, hook, objective, tokens seen, versions, config;
                          written last, so its presence marks a finished run

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..stats import LatentStats
from .checkpoint import atomic_write, atomic_write_text
from .examples import TopExamples

OUTPUT_FILES = ("stats.safetensors", "examples.safetensors", "latents.parquet", "report.png", "meta.json")


def _decode_many(tokenizer, seqs: list[list[int]]) -> list[str]:
    if tokenizer is None:
        return [" ".join(map(str, ids)) for ids in seqs]
    return tokenizer.batch_decode(seqs)


def latents_table(stats: LatentStats, examples: TopExamples, tokenizer=None):
    """A pandas DataFrame with one row per latent: the statistics and ``top_examples`` (a list,
    best first, of dicts doc, pos, score, act, token, context; the example's token is marked
    ``[[...]]`` in its context)."""
    import pandas as pd

    df = pd.DataFrame({
        "latent": torch.arange(stats.d_sae).numpy(),
        "count": stats.count.cpu().numpy(),
        "frequency": stats.frequency.cpu().numpy(),
        "mean_act": stats.mean_act.cpu().numpy(),
        "score_sum": stats.score_sum.cpu().numpy(),
        "mean_score": stats.mean_score.cpu().numpy(),
        "relu_sum": stats.relu_sum.cpu().numpy(),
        "mean_relu_score": stats.mean_relu_score.cpu().numpy(),
        "abs_sum": stats.abs_sum.cpu().numpy(),
        "score_max": stats.score_max.cpu().numpy(),
    })
    filled = (examples.doc >= 0).cpu()
    rows, cols = filled.nonzero(as_tuple=True)  # row-major: latent, then rank (best first)
    c = examples.context
    ctx = examples.ctx.cpu()[rows, cols].tolist()
    left = [[t for t in x[:c] if t >= 0] for x in ctx]
    mid = [x[c:c + 1] for x in ctx]
    right = [[t for t in x[c + 1:] if t >= 0] for x in ctx]
    L, M, R = _decode_many(tokenizer, left), _decode_many(tokenizer, mid), _decode_many(tokenizer, right)
    doc = examples.doc.cpu()[rows, cols].tolist()
    pos = examples.pos.cpu()[rows, cols].tolist()
    score = examples.score.cpu()[rows, cols].tolist()
    act = examples.act.cpu()[rows, cols].tolist()
    tops: list[list[dict]] = [[] for _ in range(stats.d_sae)]
    for i, j in enumerate(rows.tolist()):
        tops[j].append({"doc": doc[i], "pos": pos[i], "score": score[i], "act": act[i], "token": M[i],
                        "context": L[i] + "[[" + M[i] + "]]" + R[i]})
    df["top_examples"] = tops
    return df


def write_parquet(df, path) -> None:
    """Write ``df`` to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ex = pa.struct([("doc", pa.int64()), ("pos", pa.int64()), ("score", pa.float64()), ("act", pa.float64()),
                    ("token", pa.string()), ("context", pa.string())])
    schema = pa.Schema.from_pandas(df.drop(columns=["top_examples"]), preserve_index=False)
    schema = schema.append(pa.field("top_examples", pa.list_(ex)))
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_report_png(stats: LatentStats, path, title: str = "", top: int = 20) -> None:
    """Three panels: mean influence vs activation frequency, the distribution of per-latent
    mean scores, and the latents with the largest total positive influence."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no GUI, no global state
    from matplotlib.figure import Figure

    active = (stats.count > 0).cpu().numpy()
    freq = stats.frequency.cpu().numpy()[active]
    mean_score = stats.mean_score.cpu().numpy()[active]
    fig = Figure(figsize=(16, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    if active.any():
        ax[0].scatter(freq, mean_score, s=3, alpha=0.5)
        ax[0].set_xscale("log")
        ax[0].axhline(0, color="grey", lw=0.5)
        ax[1].hist(mean_score, bins=80, log=True)
    ax[0].set_xlabel("activation frequency")
    ax[0].set_ylabel("mean influence when active")
    ax[0].set_title("influence vs activation frequency")
    ax[1].set_xlabel("mean influence when active")
    ax[1].set_ylabel("latents")
    ax[1].set_title(f"score histogram ({int(active.sum())} active latents)")
    idx, val = stats.top(min(top, stats.d_sae), by="relu_sum")
    keep = val.numpy() > 0
    idx, val = idx.numpy()[keep], val.numpy()[keep]
    ax[2].barh(np.arange(len(idx))[::-1], val / max(1, stats.tokens))
    ax[2].set_yticks(np.arange(len(idx))[::-1], [str(i) for i in idx], fontsize=7)
    ax[2].set_xlabel("mean relu(influence) per token")
    ax[2].set_title(f"top {len(idx)} latents")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.86, wspace=0.28)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_outputs(out, stats: LatentStats, examples: TopExamples, meta: dict, tokenizer=None) -> None:
    """Write the whole output directory; ``meta.json`` last."""
    from safetensors.torch import save_file

    out = Path(out)
    stats.save(out / "stats.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in examples.to_dict().items()}
    atomic_write(out / "examples.safetensors", lambda tmp: save_file(tensors, tmp))
    write_parquet(latents_table(stats, examples, tokenizer), out / "latents.parquet")
    title = f"{meta.get('model', {}).get('name', '')} {meta.get('hook', '')} objective={meta.get('objective', '')}"
    write_report_png(stats, out / "report.png", title=title)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(out) -> dict | None:
    """``meta.json`` of a finished run in ``out``, or None."""
    p = Path(out) / "meta.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
