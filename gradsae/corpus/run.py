"""``score_corpus``: GradSAE influence statistics over a whole corpus, streaming.

One forward and one backward per batch (:meth:`gradsae.GradSAE.attribute`); each batch's
sparse influence goes into :class:`gradsae.LatentStats` and :class:`TopExamples` and is then
dropped, so memory stays flat however long the corpus is. Checkpoints make a killed run
resumable with results identical to an uninterrupted one; under torchrun the batches are
shared between processes and the results reduced (see :mod:`gradsae.corpus.distributed`).

A run has three stages (:class:`CorpusRun`): ``setup`` checks everything that can be checked
before the first batch (settings, device, sequence length, hook, output directory, a resumed
run's checkpoint and data) and writes nothing; ``loop`` scores the batches, writing
checkpoints, and on Ctrl-C or an I/O error writes one of the batches done so far before it
stops; ``finish`` reduces over processes and writes the outputs.

Several SAEs in one run (``sae`` a list or a ``{hook: sae}`` mapping): one forward and one
backward per batch give every SAE's influence (:class:`gradsae.GradSAE` with several SAEs),
and each hook gets its own statistics and top examples, written under
``<out>/hooks/<hook>/`` (the same files as a single-SAE run, but ``meta.json``), with one
``meta.json`` for the run at ``<out>``. Checkpoints hold every hook's tables in one file per
rank, so resuming and torchrun work as for one SAE.
"""

from __future__ import annotations

import contextlib
import json
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GradSAEError, InputError
from ..fsutil import atomic_write_text
from ..model import objectives as _obj
from ..op import fused_backend
from ..stats import LatentStats
from . import distributed as D
from . import preflight, resume
from .batching import Cursor, make_batches
from .config import AUTOCAST, DEFAULT_OBJECTIVE, RunConfig
from .data import Corpus, open_corpus
from .examples import TopExamples
from .report import OUTPUT_FILES, plot_unavailable, write_outputs, write_tables
from .resume import Checkpointer, Fingerprint, RunInterrupted, RunIOError, RunState

RESUME_HINT = "resume=True (CLI: --resume)"


@dataclass
class CorpusResult:
    """What :func:`score_corpus` returns: ``stats`` (:class:`LatentStats`, reduced over all
    ranks), ``examples`` (:class:`TopExamples`), ``meta`` (the content of ``meta.json``) and
    ``out`` (the output directory, or None). A run with several SAEs: ``hooks`` maps each hook
    to its :class:`HookResult`; ``stats`` and ``examples`` are the first hook's."""

    stats: LatentStats
    examples: TopExamples
    meta: dict = field(default_factory=dict)
    out: Path | None = None
    hooks: dict = field(default_factory=dict)


@dataclass
class HookResult:
    """One hook's results in a run with several SAEs: ``stats``, ``examples`` and ``out``
    (its directory, ``<out>/hooks/<hook>``, or None)."""

    stats: LatentStats
    examples: TopExamples
    out: Path | None = None


def _model_name(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(model).__name__)


def _versions() -> dict:
    from ..version import __version__

    out = {"gradsae": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _describe_sae(sae) -> dict:
    return {"d_in": sae.d_in, "d_sae": sae.d_sae, "activation": sae.activation, "k": sae.k,
            "hook_name": sae.hook_name, "dtype": str(sae.dtype).replace("torch.", "")}


def _sae_pairs(sae, hook) -> tuple[bool, list]:
    """``(multi, [(hook or None, sae), ...])`` from :func:`score_corpus`'s ``sae`` and ``hook``."""
    from collections.abc import Mapping

    if isinstance(sae, Mapping):
        if hook is not None:
            raise InputError("a {hook: sae} mapping names its hooks; do not also pass hook=")
        if not sae:
            raise InputError("the {hook: sae} mapping is empty; pass at least one SAE")
        return True, list(sae.items())
    if isinstance(sae, (list, tuple)):
        if not sae:
            raise InputError("the list of SAEs is empty; pass at least one SAE")
        if hook is None:
            hooks = [None] * len(sae)
        elif isinstance(hook, (list, tuple)) and len(hook) == len(sae):
            hooks = list(hook)
        else:
            n = len(hook) if isinstance(hook, (list, tuple)) else 1
            raise InputError(f"{len(sae)} SAEs need one hook each (or none: each SAE's own hook_name); got {n} "
                             "(CLI: one --hook per --sae)")
        return True, list(zip(hooks, sae))
    if isinstance(hook, (list, tuple)):
        if len(hook) != 1:
            raise InputError(f"one SAE takes one hook, got {len(hook)}")
        hook = hook[0]
    return False, [(hook, sae)]


@dataclass
class _HookView:
    """What :func:`preflight.check_hook` reads of a scorer, for one hook of several."""

    model: object
    point: object


class _SigintGuard:
    """Ctrl-C during a run: a KeyboardInterrupt at once, except inside :meth:`critical`
    (the accumulators being updated), where it waits for the block to end, so a checkpoint
    written after it never holds half a batch. Installed only in the main thread, and only
    over Python's default handler."""

    def __init__(self):
        self.depth, self.pending, self.prev = 0, False, None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            self.prev = None

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def hold(self):
        """Defer Ctrl-C during the block and drop it (the run is already stopping)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.pending = False


def score_corpus(
    model,
    sae,
    data,
    *,
    hook: str | None = None,
    objective=DEFAULT_OBJECTIVE,
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
    method: str = "grad",
    steps: int = 16,
    **objective_kwargs,
) -> CorpusResult:
    """Score every token of a corpus with GradSAE and aggregate per-latent statistics.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...).logits``).
        sae: a :class:`gradsae.SAE` whose ``d_in`` matches the hook; or several, scored in one
            forward and backward per batch: a list (with ``hook`` a list of one hook or None
            per SAE, or None: each SAE's own ``hook_name``) or a ``{hook: sae}`` mapping. Each
            hook's statistics and examples go to ``<out>/hooks/<hook>/`` and
            :attr:`CorpusResult.hooks`; one ``meta.json`` describes the run.
        data: a path (text: one document per line; ``.jsonl``; ``.parquet``; a ``datasets``
            directory) or a list of strings; see :func:`gradsae.corpus.data.open_corpus`.
        hook: where the SAE sits (TransformerLens-style name or module path; default: the
            SAE's ``hook_name``; a hook other than the SAE's own gives a warning).
        objective: the scalar Y per sequence whose gradient is taken. Default ``"loglik"``,
            the mean log-probability of each actual next token: a positive influence means the
            latent helps the model predict the text. ``"loss"`` (the mean next-token loss, so
            positive = hurts the prediction), or any objective of
            :meth:`gradsae.GradSAE.attribute`, whose extra keyword arguments (``position``,
            ``target``, ``a``, ``b``) pass through ``objective_kwargs``.
        mode: ``"splice"`` or ``"error"`` (see :class:`gradsae.GradSAE`).
        tokenizer: a transformers tokenizer for the model (required).
        out: output directory (``stats.safetensors``, ``examples.safetensors``,
            ``latents.parquet``, ``meta.json``, ``report.png`` when matplotlib is installed)
            and checkpoints; None keeps everything in memory (no checkpoints).
        field, format, split, encoding_errors: how to read ``data`` (see ``open_corpus``).
        max_length: tokens per sequence (default: the model's positions, at most 1024; more
            than the model's positions is refused).
        long: ``"window"`` cuts long documents into consecutive windows; ``"truncate"`` keeps
            the first ``max_length`` tokens.
        batch_tokens: padded tokens per batch (batch size x longest sequence).
        top_n, context: examples kept per latent, and tokens of context either side.
        autocast: ``"bf16"`` (or ``"fp16"``) runs the model under ``torch.autocast``.
        device: where to run (default: the model's device; under torchrun with CUDA, the
            local rank's GPU). The model and SAE are moved there.
        checkpoint_every, checkpoint_interval: write a checkpoint after this many batches
            and/or seconds (needs ``out``). Ctrl-C and I/O errors also write one.
        resume: continue the unfinished run in ``out`` (a fresh start if there is none); the
            settings and the documents read so far must be those of the interrupted run.
        overwrite: replace a finished or unfinished run in ``out``.
        progress: show a progress bar (tokens/s, ETA) and a summary line (rank 0).
        backend: influence backend.
        deterministic: bitwise reproducible accumulation on CUDA too (slower there).
        method: ``"grad"`` (default, the first-order score) or ``"ig"`` (integrated gradients
            from zero at the SAE's latents, ``steps`` forward/backward passes per batch; one
            SAE, not a transcoder; see :mod:`gradsae.model.methods`).

    Returns:
        :class:`CorpusResult` (``stats``, ``examples``, ``meta``, ``out``).

    Raises:
        InputError: a bad setting or input, found before the first batch.
        RunIOError: a write or read failed mid-run (the last checkpoint is kept).
        RunInterrupted: Ctrl-C (a :class:`KeyboardInterrupt`; a checkpoint of the batches
            done is written when there is an output directory).
    """
    config = RunConfig(
        hook=hook, objective=objective, objective_kwargs=objective_kwargs, mode=mode, max_length=max_length,
        long=long, batch_tokens=batch_tokens, top_n=top_n, context=context, autocast=autocast, backend=backend,
        deterministic=deterministic, method=method, steps=steps, field=field, format=format, split=split, encoding_errors=encoding_errors,
        out=out, device=device, checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval,
        resume=resume, overwrite=overwrite, progress=progress)
    return run_corpus(model, sae, data, config, tokenizer=tokenizer)


def run_corpus(model, sae, data, config: RunConfig, tokenizer=None) -> CorpusResult:
    """:func:`score_corpus` with its settings in a :class:`RunConfig`."""
    t_start = time.perf_counter()
    if tokenizer is None:
        raise InputError("score_corpus needs the model's tokenizer (tokenizer=...)")
    corpus = open_corpus(data, format=config.format, field=config.field, split=config.split,
                         encoding_errors=config.encoding_errors)
    preflight.check_device(config.device)
    ctx = D.context_from_env(config.device)
    try:
        run = CorpusRun(model, sae, corpus, tokenizer, config, ctx, t_start)
        run.setup()
        run.loop()
        return run.finish()
    finally:
        ctx.close()


class CorpusRun:
    """One corpus run in three stages: :meth:`setup`, :meth:`loop`, :meth:`finish` (see the
    module docstring)."""

    def __init__(self, model, sae, corpus: Corpus, tokenizer, config: RunConfig, ctx: D.DistContext,
                 t_start: float | None = None):
        self.model, self.sae, self.corpus, self.tok = model, sae, corpus, tokenizer
        self.cfg, self.ctx = config, ctx
        self.t_start = time.perf_counter() if t_start is None else t_start

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything that can be checked before the first batch; writes nothing (beyond
        clearing ``out`` for ``overwrite``)."""
        from ..model import GradSAE

        cfg, ctx = self.cfg, self.ctx
        self.out = cfg.out
        # report.png: decided now, not after the work
        self.plot_skipped = plot_unavailable() if self.out is not None else None
        if self.plot_skipped and ctx.is_main:
            warnings.warn(f"report.png will not be written: {self.plot_skipped}", UserWarning, stacklevel=2)

        # ---- what the output directory allows (every rank checks before anything is written)
        resume_from = None
        if self.out is not None:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise InputError("writing latents.parquet needs pyarrow, a dependency of gradsae: "
                                 "pip install pyarrow") from None
            resume_from = resume.check_out_dir(self.out, ctx.rank, ctx.world_size, cfg.resume, cfg.overwrite)
            if ctx.is_main:
                resume.probe_writable(self.out)
        device = cfg.device
        if ctx.active and device is None and torch.cuda.is_available():
            device = f"cuda:{ctx.local_rank}"
        if device is not None:
            self.model = self.model.to(device)
        dev = next(self.model.parameters()).device
        max_length = preflight.resolve_max_length(self.model, cfg.max_length)
        if max_length < cfg.min_length:
            raise InputError(f"objective {cfg.objective_name!r} needs max_length >= {cfg.min_length}")
        preflight.check_objective_tokens(self.model, cfg.objective_kwargs)
        self.multi, pairs = _sae_pairs(self.sae, cfg.hook)
        if self.multi:
            self.scorer = GradSAE(self.model, [sv for _, sv in pairs], hooks=[preflight.sae_hook(sv, h) for h, sv in pairs],
                                  mode=cfg.mode, backend=cfg.backend)
            for (_, sv), h in zip(pairs, self.scorer.hooks):
                preflight.check_hook(_HookView(self.scorer.model, self.scorer.points[h]), sv)
        else:
            (h, sv), = pairs
            self.scorer = GradSAE(self.model, sv, hook=preflight.sae_hook(sv, h), mode=cfg.mode, backend=cfg.backend)
            preflight.check_hook(self.scorer, sv)
        if cfg.method != "grad":
            self.scorer.require_one_sae(f"method={cfg.method!r}")
        self.sae = self.scorer.sae
        self.saes = dict(self.scorer.saes)
        self.dev = dev
        hook = tuple(self.scorer.hooks) if self.multi else self.scorer.point.name
        self.cfg = cfg = cfg.resolved(hook=hook, max_length=max_length, device=str(dev))
        tok = self.tok
        self.record = {
            **cfg.record(), "data": self.corpus.describe(), "model": _model_name(self.model),
            "sae": [_describe_sae(sv) for sv in self.saes.values()] if self.multi else _describe_sae(self.sae),
            "world_size": ctx.world_size,
            "tokenizer": type(tok).__name__ + ":" + str(getattr(tok, "name_or_path", "")),
        }
        self.all_stats = {h: LatentStats(sv.d_sae, device=dev) for h, sv in self.saes.items()}
        # where a kernel backend serves, each batch's backward feeds its statistics straight
        # into per-batch tables (fused into the gather-dot), merged when the batch commits
        self.fused = {h: cfg.method == "grad" and fused_backend(sv, dev, cfg.backend) is not None
                      for h, sv in self.saes.items()}
        self.fused_stats = self.fused[self.scorer.hooks[0]]
        self.all_examples = {h: TopExamples(sv.d_sae, cfg.top_n, cfg.context, device=dev)
                             for h, sv in self.saes.items()}
        self.state = RunState(config=self.record, rank=ctx.rank, world_size=ctx.world_size)
        self.fp = Fingerprint()
        ck_file = resume.checkpoint_path(self.out, ctx.rank, ctx.world_size) if self.out is not None else None
        self.ck = Checkpointer(ck_file, cfg.checkpoint_every, cfg.checkpoint_interval, time.perf_counter())
        if resume_from is not None:
            stats, examples, saved, self.fp = resume.restore(
                resume_from, self.record, self.corpus, self.out, device=dev, progress=cfg.progress and ctx.is_main)
            if isinstance(stats, dict) != self.multi or (self.multi and list(stats) != self.scorer.hooks):
                raise InputError(f"cannot resume {self.out}: its checkpoint holds the tables of "
                                 f"{list(stats) if isinstance(stats, dict) else 'one SAE'}, this run scores "
                                 f"{self.scorer.hooks}; use the same SAEs and hooks, or overwrite=True "
                                 "(CLI: --overwrite) to start over")
            if self.multi:
                self.all_stats, self.all_examples = stats, examples
            else:
                self.all_stats, self.all_examples = {self.scorer.hooks[0]: stats}, {self.scorer.hooks[0]: examples}
            self.state.next_batch, self.state.cursor = saved.next_batch, saved.cursor
            self.state.counts, self.state.elapsed = saved.counts, saved.elapsed
            self.state.fingerprint = saved.fingerprint
            self.ck.saved = saved
        if self.out is not None:
            D.barrier(ctx)
            if cfg.overwrite and ctx.is_main and self.out.exists():
                resume.clear(self.out)
            D.barrier(ctx)

    # ------------------------------------------------------------------ tables
    @property
    def stats(self) -> LatentStats:
        """The (first) hook's statistics."""
        return self.all_stats[self.scorer.hooks[0]]

    @property
    def examples(self) -> TopExamples:
        """The (first) hook's top examples."""
        return self.all_examples[self.scorer.hooks[0]]

    def _tables(self):
        """What a checkpoint holds: the statistics and examples (``{hook: ...}`` with several SAEs)."""
        if self.multi:
            return self.all_stats, self.all_examples
        return self.stats, self.examples

    def _commit(self, att, sinks: dict, batch, deterministic: bool) -> None:
        """Add one scored batch into every hook's statistics and examples."""
        infs = att.influences or {self.scorer.hooks[0]: att.influence}
        for h, inf in infs.items():
            if h in sinks:
                self.all_stats[h].merge(sinks[h])
            else:
                self.all_stats[h].update(inf, att.mask, deterministic=deterministic)
            self.all_examples[h].update(inf, att.mask, batch.input_ids, batch.attention_mask,
                                        batch.doc_ids, batch.offsets)

    # ------------------------------------------------------------------ loop
    def _snapshot(self, index: int, cursor: Cursor) -> RunState:
        st = self.state
        return RunState(next_batch=index, cursor=cursor, counts=dict(st.counts),
                        elapsed=st.elapsed + time.perf_counter() - self.t0, config=self.record,
                        fingerprint=self.fp.upto(cursor.doc), rank=self.ctx.rank, world_size=self.ctx.world_size)

    def _save(self, at: RunState) -> None:
        self.ck.save(*self._tables(), at, time.perf_counter())

    def loop(self) -> None:
        """Score every batch from the state's cursor on, checkpointing as configured. On
        Ctrl-C or an I/O error, write a checkpoint of the batches done before stopping."""
        cfg, ctx = self.cfg, self.ctx
        st = self.state
        batches = make_batches(self.fp.tap(self.corpus), self.tok, max_length=cfg.max_length,
                               batch_tokens=cfg.batch_tokens, long=cfg.long, start=st.cursor,
                               first_index=st.next_batch, pad_id=self._pad_id(), min_length=cfg.min_length)
        amp = AUTOCAST[cfg.autocast]
        dev = self.dev
        amp_ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else contextlib.nullcontext
        obj_kw = cfg.objective_kwargs
        method_kw = {} if cfg.method == "grad" else {"method": cfg.method, "steps": cfg.steps}

        from tqdm.auto import tqdm

        self.n_records = len(self.corpus)
        bar = tqdm(total=self.n_records, initial=st.cursor.doc, unit="doc", dynamic_ncols=True, desc="gradsae score",
                   disable=not (cfg.progress and ctx.is_main), file=sys.stderr)
        self.t0 = time.perf_counter()
        tokens0 = self.stats.tokens
        # (next batch, its cursor): what a checkpoint written now would resume from
        at = (st.next_batch, st.cursor)
        consistent = True  # the accumulators hold exactly the batches before ``at``
        guard = _SigintGuard()
        with guard:
            try:
                it = iter(batches)
                nxt = next(it, None)
                while nxt is not None:
                    batch = nxt
                    if self.ck.due(time.perf_counter()):
                        self._save(self._snapshot(*at))
                    bar.update(max(0, int(batch.doc_ids[-1]) + 1 - bar.n))
                    mine = batch.index % ctx.world_size == ctx.rank
                    if mine:
                        sinks = {h: LatentStats(sv.d_sae, device=dev) for h, sv in self.saes.items() if self.fused[h]}
                        sink = sinks if self.multi else sinks.get(self.scorer.hooks[0])
                        with amp_ctx():
                            att = self.scorer.attribute(batch.input_ids.to(dev), batch.attention_mask.to(dev),
                                                        objective=cfg.objective, stats=sink,
                                                        deterministic=cfg.deterministic, error_node=False,
                                                        **method_kw, **obj_kw)
                    nxt = next(it, None)  # read on before committing: its cursor is the next ``at``
                    with guard.critical():
                        consistent = False
                        if mine:
                            self._commit(att, sinks, batch, cfg.deterministic)
                            del att
                            st.counts["documents"] += batch.new_docs
                            st.counts["sequences"] += batch.input_ids.shape[0]
                            st.counts["batches"] += 1
                            self.ck.since += 1
                        at = (nxt.index, nxt.start) if nxt is not None else (batch.index + 1, Cursor(self.fp.read, 0))
                        consistent = True
                    dt = time.perf_counter() - self.t0
                    if dt > 0:
                        bar.set_postfix_str(f"{(self.stats.tokens - tokens0) * ctx.world_size / dt:,.0f} tok/s",
                                            refresh=False)
                if at[1].doc < self.fp.read:  # trailing records that gave no sequence
                    at = (at[0], Cursor(self.fp.read, 0))
                bar.update(self.n_records - bar.n)
            except KeyboardInterrupt:
                bar.close()
                if self.ck.path is None or not consistent:
                    raise
                if self.ck.since > 0:  # batches done since the last checkpoint
                    with guard.hold():
                        try:
                            self._save(self._snapshot(*at))
                        except OSError as e:
                            raise RunIOError(self._io_message(e, "writing the checkpoint after Ctrl-C")) from e
                if self.ck.saved is None:
                    raise  # nothing was scored: nothing to resume
                n = self.ck.saved.counts["batches"]
                raise RunInterrupted(
                    f"interrupted; a checkpoint of the {n} batch{'es' * (n != 1)} done is in "
                    f"{self.ck.path.parent}: continue with {RESUME_HINT}", self.ck.path) from None
            except (OSError, GradSAEError) as e:
                bar.close()
                if self.ck.path is None:
                    raise
                saved_now = False
                if consistent and self.ck.since > 0:  # keep what was done if a checkpoint can still be written
                    with contextlib.suppress(OSError), guard.hold():
                        self._save(self._snapshot(*at))
                        saved_now = True
                if isinstance(e, OSError):
                    raise RunIOError(self._io_message(e, "during the run")) from e
                if saved_now:
                    e.args = (f"{e.args[0] if e.args else e}; {self.ck.describe_kept()}: fix it and continue "
                              f"with {RESUME_HINT}",) + tuple(e.args[1:])
                raise
            finally:
                bar.close()
        self.end = at

    def _io_message(self, e: OSError, when: str) -> str:
        what = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
        kept = self.ck.describe_kept()
        cont = (f"; free space or fix the problem and continue with {RESUME_HINT}"
                if self.ck.path is not None and self.ck.path.is_file() else "")
        return f"I/O error {when} ({what}); {kept}{cont}"

    def _pad_id(self) -> int:
        tok = self.tok
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # ------------------------------------------------------------------ finish
    def finish(self) -> CorpusResult:
        """Reduce over ranks, write the outputs (rank 0) and drop the checkpoints."""
        cfg, ctx, st = self.cfg, self.ctx, self.state
        out = self.out
        local_end = self._snapshot(*self.end) if out is not None and not ctx.active else None
        all_stats = {h: D.all_reduce_stats(ctx, st_) for h, st_ in self.all_stats.items()}
        all_examples = {h: D.gather_examples(ctx, ex) for h, ex in self.all_examples.items()}
        stats, examples = all_stats[self.scorer.hooks[0]], all_examples[self.scorer.hooks[0]]
        counts = D.all_reduce_counts(ctx, st.counts)
        elapsed = D.all_reduce_max(ctx, st.elapsed + time.perf_counter() - self.t0)
        n_records = self.n_records
        if stats.tokens == 0:
            raise InputError(f"no tokens to score: none of the {n_records} documents of the corpus has "
                             + (f"{cfg.min_length} tokens (objective {cfg.objective_name!r} needs "
                                f"{cfg.min_length})" if cfg.min_length > 1 else "a token"))
        session_s = time.perf_counter() - self.t_start
        sign = _obj.meaning(cfg.objective)
        meta = {
            "complete": True,
            "model": {"name": _model_name(self.model),
                      "type": getattr(getattr(self.model, "config", None), "model_type", None)},
            "sae": _describe_sae(self.sae), "hook": self.scorer.point.name,
            "hook_module": self.scorer.point.module_path,
            "objective": cfg.objective_name, "sign": {"y": sign["y"], "positive": sign["positive"]},
            "mode": cfg.mode, "tokens": stats.tokens,
            "documents": counts["documents"], "records": n_records, "records_skipped": n_records - counts["documents"],
            "sequences": counts["sequences"], "batches": counts["batches"],
            "active_latents": int((stats.count > 0).sum()), "seconds": round(elapsed, 3),
            "tokens_per_second": round(stats.tokens / elapsed, 2) if elapsed > 0 else None,
            "world_size": ctx.world_size, "device": str(self.dev), "versions": _versions(),
            "config": self.record,
        }
        if self.plot_skipped:
            meta["skipped"] = {"report.png": self.plot_skipped}
        if out is not None:
            meta["files"] = [f for f in OUTPUT_FILES if f not in meta.get("skipped", {})]
        if self.multi:
            meta["hook"] = list(self.scorer.hooks)
            meta["hook_module"] = [self.scorer.points[h].module_path for h in self.scorer.hooks]
            meta["sae"] = [_describe_sae(sv) for sv in self.saes.values()]
            meta["active_latents"] = {h: int((st_.count > 0).sum()) for h, st_ in all_stats.items()}
            meta["hooks"] = {h: {"dir": f"{resume.HOOKS_DIR}/{resume.hook_dir(h)}",
                                 "hook_module": self.scorer.points[h].module_path,
                                 "sae": _describe_sae(self.saes[h]),
                                 "active_latents": meta["active_latents"][h]} for h in self.scorer.hooks}
            if out is not None:
                names = [f for f in OUTPUT_FILES if f != "meta.json" and f not in meta.get("skipped", {})]
                meta["files"] = [f"{d['dir']}/{f}" for d in meta["hooks"].values() for f in names] + ["meta.json"]
        if out is not None:
            if ctx.is_main:
                if self.multi:
                    self._write_multi(out, all_stats, all_examples, meta, local_end)
                else:
                    self._write(out, stats, examples, meta, local_end)
            D.barrier(ctx)
            if self.ck.path is not None and self.ck.path.is_file():
                self.ck.path.unlink()
            D.barrier(ctx)
            if ctx.is_main:
                resume.drop_leftovers(out)
        if cfg.progress and ctx.is_main:
            print(f"gradsae score: {stats.tokens:,} tokens from {counts['documents']:,} documents "
                  f"({n_records - counts['documents']:,} skipped: empty or too short) in {elapsed:,.1f} s, "
                  f"{stats.tokens / max(elapsed, 1e-9):,.0f} tok/s over {ctx.world_size} process(es); "
                  + (f"{meta['active_latents']:,} of {self.sae.d_sae:,} latents active" if not self.multi else
                     "latents active: " + ", ".join(f"{h} {n:,} of {self.saes[h].d_sae:,}"
                                                    for h, n in meta["active_latents"].items()))
                  + (f"; wrote {out}" if out is not None else "") + f" [{session_s:,.1f} s total]",
                  file=sys.stderr)
        hooks = {}
        if self.multi:
            hooks = {h: HookResult(all_stats[h], all_examples[h],
                                   out / resume.HOOKS_DIR / resume.hook_dir(h) if out is not None else None)
                     for h in self.scorer.hooks}
        return CorpusResult(stats, examples, meta, out, hooks)

    def _write_multi(self, out: Path, all_stats: dict, all_examples: dict, meta: dict,
                     local_end: RunState | None) -> None:
        """Write every hook's outputs under ``<out>/hooks/`` and then ``meta.json`` (last: its
        presence marks a finished run); on failure, as :meth:`_write`."""

        def write():
            try:
                for h in self.scorer.hooks:
                    d = out / resume.HOOKS_DIR / resume.hook_dir(h)
                    d.mkdir(parents=True, exist_ok=True)
                    write_tables(d, all_stats[h], all_examples[h], meta, h, self.tok, plot=not self.plot_skipped)
                atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
            except BaseException:
                resume.remove_outputs(out)
                raise

        self._guarded_write(write, local_end)

    def _write(self, out: Path, stats, examples, meta: dict, local_end: RunState | None) -> None:
        """Write the outputs; if that fails, keep the work: a checkpoint at the end of the
        corpus (single process) from which a resumed run only writes the outputs."""
        self._guarded_write(lambda: write_outputs(out, stats, examples, meta, self.tok, plot=not self.plot_skipped),
                            local_end)

    def _guarded_write(self, write, local_end: RunState | None) -> None:
        """Run ``write`` with Ctrl-C held off its critical parts; on an I/O error or Ctrl-C save
        ``local_end`` (when given) so that ``--resume`` only writes the outputs, and say so."""
        guard = _SigintGuard()
        with guard:
            try:
                write()
            except (OSError, KeyboardInterrupt) as e:
                if local_end is not None:
                    with contextlib.suppress(OSError), guard.hold():
                        self._save(local_end)
                if isinstance(e, KeyboardInterrupt):
                    if self.ck.path is not None and self.ck.path.is_file():
                        raise RunInterrupted(f"interrupted while writing the outputs; {self.ck.describe_kept()}: "
                                             f"continue with {RESUME_HINT}", self.ck.path) from None
                    raise
                raise RunIOError(self._io_message(e, "writing the outputs")) from e

__all__ = ["score_corpus", "run_corpus", "CorpusRun", "CorpusResult", "HookResult", "RunConfig"]
