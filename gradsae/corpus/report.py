"""The output directory of a corpus run.

    stats.safetensors     LatentStats.save (per-latent sums, counts, max; tokens)
    examples.safetensors  the raw top-example tables (TopExamples.to_dict)
    latents.parquet       one row per latent: statistics + top and bottom examples with decoded
                          context and per-token values (the main output)
    report.png            influence vs activation frequency, score histogram, top latents
                          (needs matplotlib; skipped with a note without it)
    meta.json             model, SAE, hook, objective and what its sign means, tokens seen,
                          versions, config; written last, so its presence marks a finished run

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fsutil import atomic_write, atomic_write_text
from ..stats import LatentStats
from .examples import TopExamples

OUTPUT_FILES = ("stats.safetensors", "examples.safetensors", "latents.parquet", "report.png", "meta.json")


def _decoder(tokenizer):
    """A function decoding a list of token-id lists (the fast tokenizer's batch decode where
    there is one: python-side per-item decoding is ~50x slower at 10^5 examples)."""
    if tokenizer is None:
        return lambda seqs: [" ".join(map(str, ids)) for ids in seqs]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=False)
    return lambda seqs: tokenizer.batch_decode(seqs)


def latents_arrow(stats: LatentStats, examples: TopExamples, tokenizer=None):
    """A pyarrow Table with one row per latent: the statistics, ``top_examples`` (a list,
    best first, of structs doc, pos, score, act, ``token`` (the example's token, decoded),
    ``left`` and ``right`` (the decoded context before and after it, within its sequence;
    ``left + token + right`` reads as the text around the example), ``tokens`` (the window's
    tokens, each decoded on its own), ``acts`` and ``scores`` (the latent's activation and
    influence at each of those tokens) and ``center`` (the example's index in ``tokens``)) and
    ``bottom_examples`` (the same structs for the most negative scores, most negative first)."""
    import numpy as np
    import pyarrow as pa

    cols = {
        "latent": np.arange(stats.d_sae, dtype=np.int64),
        "count": stats.count.cpu().numpy(),
        "frequency": stats.frequency.cpu().numpy(),
        "mean_act": stats.mean_act.cpu().numpy(),
        "score_sum": stats.score_sum.cpu().numpy(),
        "mean_score": stats.mean_score.cpu().numpy(),
        "relu_sum": stats.relu_sum.cpu().numpy(),
        "mean_relu_score": stats.mean_relu_score.cpu().numpy(),
        "abs_sum": stats.abs_sum.cpu().numpy(),
        "score_max": stats.score_max.cpu().numpy(),
    }
    decode = _decoder(tokenizer)
    table = pa.table(cols)
    for side, name in (("top", "top_examples"), ("bottom", "bottom_examples")):
        table = table.append_column(name, _examples_arrow(examples, side, decode))
    return table


def _examples_arrow(examples: TopExamples, side: str, decode):
    """One side's examples as a list-of-structs column (see :func:`latents_arrow`)."""
    import numpy as np
    import pyarrow as pa

    pre = "" if side == "top" else "bottom_"
    field = lambda f: getattr(examples, pre + f).cpu()  # noqa: E731
    filled = field("doc") >= 0
    rows, cols_ = filled.nonzero(as_tuple=True)  # row-major: latent, then rank (best first)
    c = examples.context
    all_ctx = field("ctx")[rows, cols_]
    # a token position is among the examples of several latents: decode each distinct
    # context window once
    windows, which = torch.unique(all_ctx, dim=0, return_inverse=True)
    ctx = windows.tolist()
    left = decode([[t for t in x[:c] if t >= 0] for x in ctx])
    right = decode([[t for t in x[c + 1:] if t >= 0] for x in ctx])
    uniq = sorted({t for x in ctx for t in x if t >= 0})
    piece = dict(zip(uniq, decode([[t] for t in uniq])))
    which = which.numpy()
    token = pa.array([piece[x[c]] for x in ctx], pa.string()).take(which)
    # the window, per token: ids (-1 outside the sequence removed), activations, scores
    inside = (all_ctx >= 0).numpy()
    flat_ids = all_ctx.numpy()[inside]
    lens = inside.sum(1)
    win_off = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    ids_u, inv = np.unique(flat_ids, return_inverse=True)
    pieces = pa.array([piece[int(t)] for t in ids_u], pa.string()).take(pa.array(inv.reshape(-1)))
    acts = pa.array(field("ctx_act")[rows, cols_].numpy()[inside])
    scores = pa.array(field("ctx_score")[rows, cols_].numpy()[inside])
    center = (c - (~inside[:, :c]).sum(1)).astype(np.int64)
    struct = pa.StructArray.from_arrays(
        [pa.array(field("doc")[rows, cols_].numpy()), pa.array(field("pos")[rows, cols_].numpy()),
         pa.array(field("score")[rows, cols_].numpy()), pa.array(field("act")[rows, cols_].numpy()),
         token, pa.array(left, pa.string()).take(which), pa.array(right, pa.string()).take(which),
         pa.ListArray.from_arrays(win_off, pieces), pa.ListArray.from_arrays(win_off, acts),
         pa.ListArray.from_arrays(win_off, scores), pa.array(center)],
        names=["doc", "pos", "score", "act", "token", "left", "right", "tokens", "acts", "scores", "center"])
    offsets = np.concatenate([[0], np.cumsum(filled.sum(1).numpy())]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), struct)


def latents_table(stats: LatentStats, examples: TopExamples, tokenizer=None):
    """:func:`latents_arrow` as a pandas DataFrame (``top_examples``: lists of dicts)."""
    return latents_arrow(stats, examples, tokenizer).to_pandas()


def write_parquet(table, path) -> None:
    """Write a pyarrow Table to Parquet atomically."""
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def plot_unavailable() -> str | None:
    """Why ``report.png`` cannot be drawn here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'gradsae[report]')"
    return None


def write_report_png(stats: LatentStats, path, title: str = "", top: int = 20, positive: str = "") -> None:
    """Three panels: mean influence vs activation frequency, the distribution of per-latent
    mean scores, and the latents with the largest total positive influence. ``positive``: what
    a positive influence means for the run's objective, written under the title."""
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
        ax[0].plot(freq, mean_score, "o", ms=1.5, alpha=0.5, ls="")  # draws ~10x faster than scatter
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
    ax[2].set_title(f"top {len(idx)} latents by positive influence")
    fig.suptitle(title + (f"\ninfluence > 0: {positive}" if positive else ""), fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.86, wspace=0.28)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_tables(d, stats: LatentStats, examples: TopExamples, meta: dict, hook: str, tokenizer=None,
                 plot: bool = True, written: list | None = None) -> list[str]:
    """Write one hook's tables into the directory ``d``: ``stats.safetensors``,
    ``examples.safetensors``, ``latents.parquet`` and (``plot``) ``report.png``, each atomically;
    returns the paths written, appended to ``written`` as they come (so a caller can remove
    them if a later write fails)."""
    from safetensors.torch import save_file

    d = Path(d)
    written = [] if written is None else written

    def put(name, write):
        written.append(d / name)
        write(d / name)

    put("stats.safetensors", stats.save)
    tensors = {k: v.detach().cpu().contiguous() for k, v in examples.to_dict().items()}
    put("examples.safetensors", lambda p: atomic_write(p, lambda tmp: save_file(tensors, tmp)))
    put("latents.parquet", lambda p: write_parquet(latents_arrow(stats, examples, tokenizer), p))
    if plot:
        sign = meta.get("sign", {})
        title = (f"{meta.get('model', {}).get('name', '')} {hook} "
                 f"objective={meta.get('objective', '')}" + (f" (Y = {sign['y']})" if sign.get("y") else ""))
        put("report.png", lambda p: write_report_png(stats, p, title=title, positive=sign.get("positive", "")))
    return written


def write_outputs(out, stats: LatentStats, examples: TopExamples, meta: dict, tokenizer=None,
                  plot: bool = True) -> list[str]:
    """Write the whole output directory, ``meta.json`` last (``report.png`` only with
    ``plot``); returns the names written. If a write fails, the files this call wrote are
    removed again (a part of the set is no result) and the error propagates."""
    out = Path(out)
    written: list[Path] = []
    try:
        write_tables(out, stats, examples, meta, meta.get("hook", ""), tokenizer, plot, written)
        names = [p.name for p in written]
        text = json.dumps({"files": [*names, "meta.json"], **meta}, indent=2, sort_keys=True) + "\n"
        written.append(out / "meta.json")
        atomic_write_text(out / "meta.json", text)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return [*names, "meta.json"]


def read_meta(out) -> dict | None:
    """``meta.json`` of a finished run in ``out``, or None."""
    p = Path(out) / "meta.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
