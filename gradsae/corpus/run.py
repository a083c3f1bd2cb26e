"""``score_corpus``: GradSAE influence statistics over a whole corpus, streaming.

One forward and one backward per batch (:meth:`gradsae.GradSAE.attribute`); each batch's
sparse influence goes into :class:`gradsae.LatentStats` and :class:`TopExamples` and is then
dropped, so memory stays flat however long the corpus is. Checkpoints make a killed run
resumable with results identical to an uninterrupted one; under torchrun the batches are
shared between processes and the results reduced (see :mod:`gradsae.corpus.distributed`).
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..stats import LatentStats
from . import distributed as D
from .batching import LONG_MODES, Cursor, make_batches
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .data import open_corpus
from .examples import TopExamples
from .report import OUTPUT_FILES, read_meta, write_outputs

AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}
# Settings that may change between a run and its resumption (they do not change results).
_VOLATILE = ("device", "progress", "checkpoint_every", "checkpoint_interval")


@dataclass
class CorpusResult:
    """What :func:`score_corpus` returns: ``stats`` (:class:`LatentStats`, reduced over all
    ranks), ``examples`` (:class:`TopExamples`), ``meta`` (the content of ``meta.json``) and
    ``out`` (the output directory, or None)."""

    stats: LatentStats
    examples: TopExamples
    meta: dict = field(default_factory=dict)
    out: Path | None = None


def _model_name(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(model).__name__)


def _default_max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for k in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return min(v, 1024)
    return 1024


def _versions() -> dict:
    import gradsae

    out = {"gradsae": gradsae.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _describe_sae(sae) -> dict:
    return {"d_in": sae.d_in, "d_sae": sae.d_sae, "activation": sae.activation, "k": sae.k,
            "hook_name": sae.hook_name, "dtype": str(sae.dtype).replace("torch.", "")}


def _check_out_dir(out: Path, ctx: D.DistContext, resume: bool, overwrite: bool) -> Path | None:
    """Decide what the output directory allows; returns this rank's checkpoint to resume from
    (or None). Raises before anything is written."""
    ck = checkpoint_path(out, ctx.rank, ctx.world_size)
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    meta = read_meta(out)
    ck_dir = out / "checkpoint"
    ckpts = sorted(ck_dir.glob("rank*.safetensors")) if ck_dir.is_dir() else []
    ours = set(OUTPUT_FILES) | {"checkpoint"}
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if foreign:
        raise InputError(f"output directory {out} holds files that are not from a gradsae run "
                         f"({', '.join(sorted(foreign)[:5])}); choose an empty or new directory")
    if overwrite:
        return None
    if meta is not None:
        raise InputError(f"output directory {out} holds a finished run (meta.json); pass overwrite=True "
                         "(CLI: --overwrite) to replace it, or choose another directory")
    if ckpts:
        if not resume:
            raise InputError(f"output directory {out} holds an unfinished run (checkpoint/); pass resume=True "
                             "(CLI: --resume) to continue it, or overwrite=True (CLI: --overwrite) to start over")
        if not ck.is_file():
            raise InputError(f"cannot resume: {out}/checkpoint holds {[p.name for p in ckpts]}, not "
                             f"{ck.name}; resume with the same number of processes as the interrupted run")
        return ck
    return None


def _clear(out: Path) -> None:
    for name in OUTPUT_FILES:
        p = out / name
        if p.is_file():
            p.unlink()
    _drop_leftovers(out)


def _drop_leftovers(out: Path) -> None:
    """After a finished run: the checkpoint directory (every rank has removed its checkpoint;
    what remains are temporary files of writes a kill interrupted) and such temporary files of
    the outputs."""
    if (out / "checkpoint").is_dir():
        shutil.rmtree(out / "checkpoint")
    for name in OUTPUT_FILES:
        for p in out.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def _config_diff(a: dict, b: dict) -> list[str]:
    keys = (set(a) | set(b)) - set(_VOLATILE)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def score_corpus(
    model,
    sae,
    data,
    *,
    hook: str | None = None,
    objective="loss",
    mode: str = "splice",
    tokenizer=None,
    out=None,
    field: str = "text",
    format: str | None = None,
    split: str | None = None,
    encoding_errors: str = "strict",
    max_length: int | None = None,
    long: str = "window",
    batch_tokens: int = 8192,
    top_n: int = 10,
    context: int = 8,
    autocast: str | None = None,
    device=None,
    checkpoint_every: int | None = None,
    checkpoint_interval: float | None = 600.0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    backend: str = "auto",
    deterministic: bool = False,
    **objective_kwargs,
) -> CorpusResult:
    """Score every token of a corpus with GradSAE and aggregate per-latent statistics.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...).logits``).
        sae: a :class:`gradsae.SAE` whose ``d_in`` matches the hook.
        data: a path (text: one document per line; ``.jsonl``; ``.parquet``; a ``datasets``
            directory) or a list of strings; see :func:`gradsae.corpus.data.open_corpus`.
        hook: where the SAE sits (TransformerLens-style name or module path; default: the
            SAE's ``hook_name``).
        objective: the scalar Y per sequence (default ``"loss"``, the mean next-token loss);
            any objective of :meth:`gradsae.GradSAE.attribute`, whose extra keyword arguments
            (``position``, ``target``...) pass through ``objective_kwargs``.
        mode: ``"splice"`` or ``"error"`` (see :class:`gradsae.GradSAE`).
        tokenizer: a transformers tokenizer for the model (required).
        out: output directory (``stats.safetensors``, ``examples.safetensors``,
            ``latents.parquet``, ``meta.json``, ``report.png``) and checkpoints; None keeps
            everything in memory (no checkpoints).
        field, format, split, encoding_errors: how to read ``data`` (see ``open_corpus``).
        max_length: tokens per sequence (default: the model's context, at most 1024).
        long: ``"window"`` cuts long documents into consecutive windows; ``"truncate"`` keeps
            the first ``max_length`` tokens.
        batch_tokens: padded tokens per batch (batch size x longest sequence).
        top_n, context: examples kept per latent, and tokens of context either side.
        autocast: ``"bf16"`` (or ``"fp16"``) runs the model under ``torch.autocast``.
        device: where to run (default: the model's device; under torchrun with CUDA, the
            local rank's GPU). The model and SAE are moved there.
        checkpoint_every, checkpoint_interval: write a checkpoint after this many batches
            and/or seconds (needs ``out``).
        resume: continue the unfinished run in ``out`` (a fresh start if there is none).
        overwrite: replace a finished or unfinished run in ``out``.
        progress: show a progress bar (tokens/s, ETA) and a summary line (rank 0).
        backend: influence backend.
        deterministic: bitwise reproducible accumulation on CUDA too (slower there).

    Returns:
        :class:`CorpusResult` (``stats``, ``examples``, ``meta``, ``out``).
    """
    t_start = time.perf_counter()
    if long not in LONG_MODES:
        raise InputError(f"long must be one of {LONG_MODES}, got {long!r}")
    if autocast not in AUTOCAST:
        raise InputError(f"autocast must be one of {sorted(k for k in AUTOCAST if k)} or None, got {autocast!r}")
    if tokenizer is None:
        raise InputError("score_corpus needs the model's tokenizer (tokenizer=...)")
    for name, v in (("batch_tokens", batch_tokens), ("top_n", top_n)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}")
    corpus = open_corpus(data, format=format, field=field, split=split, encoding_errors=encoding_errors)
    ctx = D.context_from_env(device)
    try:
        opts = dict(hook=hook, objective=objective, mode=mode, tokenizer=tokenizer, out=out, max_length=max_length,
                    long=long, batch_tokens=batch_tokens, top_n=top_n, context=context, autocast=autocast,
                    device=device, checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval,
                    resume=resume, overwrite=overwrite, progress=progress, backend=backend,
                    deterministic=deterministic, objective_kwargs=objective_kwargs)
        return _run(model, sae, corpus, ctx, t_start, opts)
    finally:
        ctx.close()


def _run(model, sae, corpus, ctx: D.DistContext, t_start: float, a: dict) -> CorpusResult:
    """The body of :func:`score_corpus` (``a``: its keyword arguments)."""
    from ..model import GradSAE

    device = a["device"]
    if ctx.active and device is None and torch.cuda.is_available():
        device = f"cuda:{ctx.local_rank}"
    if device is not None:
        model = model.to(device)
    dev = next(model.parameters()).device
    max_length = a["max_length"] or _default_max_length(model)
    if max_length < 2 and a["objective"] == "loss":
        raise InputError("objective 'loss' needs max_length >= 2")
    scorer = GradSAE(model, sae, hook=a["hook"], mode=a["mode"], backend=a["backend"])
    sae = scorer.sae
    tok = a["tokenizer"]
    obj_kw = a["objective_kwargs"]
    objective = a["objective"]
    config = {
        "data": corpus.describe(), "objective": objective if isinstance(objective, str) else
        f"{getattr(objective, '__module__', '')}.{getattr(objective, '__qualname__', type(objective).__name__)}",
        "objective_kwargs": {k: repr(v) for k, v in sorted(obj_kw.items())}, "mode": a["mode"],
        "hook": scorer.point.name, "max_length": max_length, "long": a["long"], "batch_tokens": a["batch_tokens"],
        "top_n": a["top_n"], "context": a["context"], "autocast": a["autocast"], "backend": a["backend"],
        "model": _model_name(model), "sae": _describe_sae(sae), "world_size": ctx.world_size,
        "tokenizer": type(tok).__name__ + ":" + str(getattr(tok, "name_or_path", "")),
        "device": str(dev), "progress": a["progress"], "checkpoint_every": a["checkpoint_every"],
        "checkpoint_interval": a["checkpoint_interval"],
    }
    out = Path(a["out"]) if a["out"] is not None else None

    # ---- what the output directory allows (every rank checks before anything is written)
    resume_from = None
    if out is not None:
        resume_from = _check_out_dir(out, ctx, a["resume"], a["overwrite"])
        D.barrier(ctx)
        if a["overwrite"] and ctx.is_main and out.exists():
            _clear(out)
        D.barrier(ctx)

    stats = LatentStats(sae.d_sae, device=dev)
    examples = TopExamples(sae.d_sae, a["top_n"], a["context"], device=dev)
    counts = {"documents": 0, "sequences": 0, "batches": 0}
    next_batch, cursor, elapsed_before = 0, Cursor(0, 0), 0.0
    if resume_from is not None:
        stats, examples, state = load_checkpoint(resume_from, device=dev)
        diff = _config_diff(state["config"], config)
        if diff:
            raise InputError(f"cannot resume {out}: the run was started with different settings ({', '.join(diff)}); "
                             "use the same settings, or overwrite=True to start over")
        next_batch, cursor = int(state["next_batch"]), Cursor(*state["cursor"])
        counts = {k: int(state["counts"][k]) for k in counts}
        elapsed_before = float(state["elapsed"])
    ck_file = checkpoint_path(out, ctx.rank, ctx.world_size) if out is not None else None

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = make_batches(corpus, tok, max_length=max_length, batch_tokens=a["batch_tokens"], long=a["long"],
                           start=cursor, first_index=next_batch, pad_id=pad_id,
                           min_length=2 if objective == "loss" else 1)
    amp = AUTOCAST[a["autocast"]]
    amp_ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    from tqdm.auto import tqdm

    n_records = len(corpus)
    bar = tqdm(total=n_records, initial=cursor.doc, unit="doc", dynamic_ncols=True, desc="gradsae score",
               disable=not (a["progress"] and ctx.is_main), file=sys.stderr)
    t0 = time.perf_counter()
    tokens0 = stats.tokens
    last_ck_time, since_ck = t0, 0

    def save(i: int, cur: Cursor) -> None:
        state = {"next_batch": i, "cursor": list(cur), "counts": counts, "config": config,
                 "elapsed": elapsed_before + time.perf_counter() - t0, "rank": ctx.rank, "world_size": ctx.world_size}
        save_checkpoint(ck_file, stats, examples, state)

    try:
        for batch in batches:
            if ck_file is not None and since_ck > 0 and (
                    (a["checkpoint_every"] and since_ck >= a["checkpoint_every"])
                    or (a["checkpoint_interval"] is not None
                        and time.perf_counter() - last_ck_time >= a["checkpoint_interval"])):
                save(batch.index, batch.start)
                last_ck_time, since_ck = time.perf_counter(), 0
            bar.update(max(0, int(batch.doc_ids[-1]) + 1 - bar.n))
            if batch.index % ctx.world_size != ctx.rank:
                continue
            with amp_ctx():
                att = scorer.attribute(batch.input_ids.to(dev), batch.attention_mask.to(dev), objective=objective,
                                       **obj_kw)
            stats.update(att.influence, att.mask, deterministic=a["deterministic"])
            examples.update(att.influence, att.mask, batch.input_ids, batch.attention_mask, batch.doc_ids,
                            batch.offsets)
            del att
            counts["documents"] += batch.new_docs
            counts["sequences"] += batch.input_ids.shape[0]
            counts["batches"] += 1
            since_ck += 1
            dt = time.perf_counter() - t0
            if dt > 0:
                bar.set_postfix_str(f"{(stats.tokens - tokens0) * ctx.world_size / dt:,.0f} tok/s", refresh=False)
        bar.update(n_records - bar.n)
    finally:
        bar.close()

    # ---- reduce over ranks, write the outputs (rank 0), drop the checkpoints
    stats = D.all_reduce_stats(ctx, stats)
    examples = D.gather_examples(ctx, examples)
    counts = D.all_reduce_counts(ctx, counts)
    elapsed = D.all_reduce_max(ctx, elapsed_before + time.perf_counter() - t0)
    if stats.tokens == 0:
        raise InputError(f"no tokens to score: none of the {n_records} documents of the corpus has "
                         f"{'2 tokens (the loss needs 2)' if objective == 'loss' else 'a token'}")
    session_s = time.perf_counter() - t_start
    meta = {
        "complete": True,
        "model": {"name": _model_name(model), "type": getattr(getattr(model, "config", None), "model_type", None)},
        "sae": _describe_sae(sae), "hook": scorer.point.name, "hook_module": scorer.point.module_path,
        "objective": config["objective"], "mode": a["mode"], "tokens": stats.tokens,
        "documents": counts["documents"], "records": n_records, "records_skipped": n_records - counts["documents"],
        "sequences": counts["sequences"], "batches": counts["batches"],
        "active_latents": int((stats.count > 0).sum()), "seconds": round(elapsed, 3),
        "tokens_per_second": round(stats.tokens / elapsed, 2) if elapsed > 0 else None,
        "world_size": ctx.world_size, "device": str(dev), "versions": _versions(),
        "config": {k: v for k, v in config.items() if k not in ("progress",)},
    }
    if out is not None:
        if ctx.is_main:
            write_outputs(out, stats, examples, meta, tok)
        D.barrier(ctx)
        if ck_file is not None and ck_file.is_file():
            ck_file.unlink()
        D.barrier(ctx)
        if ctx.is_main:
            _drop_leftovers(out)
    if a["progress"] and ctx.is_main:
        print(f"gradsae score: {stats.tokens:,} tokens from {counts['documents']:,} documents "
              f"({n_records - counts['documents']:,} skipped: empty or too short) in {elapsed:,.1f} s, "
              f"{stats.tokens / max(elapsed, 1e-9):,.0f} tok/s over {ctx.world_size} process(es); "
              f"{meta['active_latents']:,} of {sae.d_sae:,} latents active"
              + (f"; wrote {out}" if out is not None else "") + f" [{session_s:,.1f} s total]",
              file=sys.stderr)
    return CorpusResult(stats, examples, meta, out)


__all__ = ["score_corpus", "CorpusResult"]
