"""Resuming a corpus run: what the output directory allows, crash-safe checkpoints, and the
checks that a resumed run continues the same run on the same data.

Directory policy (:func:`check_out_dir`): a new or empty directory starts a run; one with
``meta.json`` holds a finished run (replace it with ``overwrite``); one with ``checkpoint/``
holds an unfinished run (continue it with ``resume`` or discard it with ``overwrite``); files
that are not from a run are never touched. :func:`probe_writable` writes and removes a file
there before any work, leaving the file system as it found it.

Checkpoints: one file per rank, ``<out>/checkpoint/rank<r>-of<w>.safetensors``, holds the
:class:`LatentStats` tensors, the :class:`TopExamples` tables and a JSON state
(:class:`RunState`: the cursor of the next batch, counters, the run's configuration record and
a fingerprint of the documents read). It is written to a temporary file in the same
directory, flushed and renamed over the old one, so a kill at any instant (SIGKILL included)
leaves the previous or the new checkpoint, never a torn one.

A resumed run must be the same run: its configuration record is compared with the
checkpoint's (:func:`config_diff`), and the documents before the cursor are read again and
hashed (:class:`Fingerprint`), so a corpus that was edited, shuffled or replaced is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import GradSAEError, InputError
from ..fsutil import atomic_write, save_safetensors
from ..stats import FIELDS, LatentStats
from .batching import Cursor
from .config import RunConfig
from .data import Corpus
from .examples import TopExamples
from .report import OUTPUT_FILES, read_meta

FORMAT = "gradsae.corpus.checkpoint"
VERSION = 2
# A run with several SAEs writes each hook's outputs under <out>/hooks/<hook dir>/.
HOOKS_DIR = "hooks"


def hook_dir(hook: str) -> str:
    """The directory name of ``hook``'s outputs under ``hooks/`` (the hook name, with path
    separators replaced)."""
    return hook.replace("/", "_").replace("\\", "_")


class RunIOError(GradSAEError, OSError):
    """Writing (or reading) failed in the middle of a run: disk full, read-only, I/O error.
    The message says what failed, which checkpoint is kept, and how to continue."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT). ``checkpoint``: the checkpoint written with the
    batches done so far (None without an output directory); ``str()`` says how to continue."""

    def __init__(self, message: str, checkpoint: Path | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------- directory policy
def checkpoint_path(out, rank: int, world_size: int) -> Path:
    return Path(out) / "checkpoint" / f"rank{rank}-of{world_size}.safetensors"


def check_out_dir(out, rank: int, world_size: int, resume: bool, overwrite: bool) -> Path | None:
    """Decide what the output directory ``out`` allows, before anything is written: returns
    this rank's checkpoint to resume from, or None to start afresh. Raises
    :class:`InputError` when the directory must not be used as asked."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("resume=True and overwrite=True contradict each other; pass one of them")
    ck = checkpoint_path(out, rank, world_size)
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    meta = read_meta(out)
    ck_dir = out / "checkpoint"
    ckpts = sorted(ck_dir.glob("rank*.safetensors")) if ck_dir.is_dir() else []
    ours = set(OUTPUT_FILES) | {"checkpoint", HOOKS_DIR}
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


def probe_writable(out) -> None:
    """Check that the directory ``out`` can be created and written, by creating it (and its
    missing parents), writing and removing a small file, and removing what it created: the
    file system is left as it was. Raises :class:`InputError` naming the reason."""
    out = Path(out)
    missing, p = [], out
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise InputError(f"cannot use output directory {out}: {p} is not a directory")
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as e:
                where = "" if d == out else f" ({d})"
                raise InputError(f"cannot create the output directory {out}: {e.strerror or e}{where}") from None
            created.append(d)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".gradsae-probe.", suffix=".tmp", dir=out)
            try:
                os.write(fd, b"gradsae")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as e:
            raise InputError(f"cannot write in the output directory {out}: {e.strerror or e}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:  # pragma: no cover - something else wrote there meanwhile
                pass


def clear(out) -> None:
    """Remove a previous run's outputs and checkpoints from ``out`` (``overwrite``)."""
    remove_outputs(out)
    drop_leftovers(out)


def remove_outputs(out) -> None:
    """Remove the output files (a set written only in part is no result), the per-hook
    outputs of a run with several SAEs included."""
    for name in OUTPUT_FILES:
        p = Path(out) / name
        if p.is_file():
            p.unlink()
    if (Path(out) / HOOKS_DIR).is_dir():
        shutil.rmtree(Path(out) / HOOKS_DIR)


def drop_leftovers(out) -> None:
    """After a finished run: the checkpoint directory (every rank has removed its checkpoint;
    what remains are temporary files of writes a kill interrupted) and such temporary files of
    the outputs."""
    out = Path(out)
    if (out / "checkpoint").is_dir():
        shutil.rmtree(out / "checkpoint")
    for name in OUTPUT_FILES:
        for p in out.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
        for p in out.glob(f"{HOOKS_DIR}/*/.{name}.*.tmp"):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- fingerprint
class Fingerprint:
    """A running hash of the documents read, in order: ``upto(n)`` is the hash of records
    ``0 .. n-1``. Readers run ahead of the batches, so each record's digest waits in a short
    queue until the cursor passes it."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.docs = 0  # records folded into the hash
        self._pending: deque[bytes] = deque()

    @property
    def read(self) -> int:
        """Records seen so far (folded or waiting)."""
        return self.docs + len(self._pending)

    def add(self, text: str) -> None:
        self._pending.append(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())

    def upto(self, n: int) -> str:
        """The hash of records ``0 .. n-1`` (``n`` never decreases between calls)."""
        if not self.docs <= n <= self.read:
            raise ValueError(f"fingerprint of {n} records asked, {self.docs}..{self.read} available")
        while self.docs < n:
            self._h.update(self._pending.popleft())
            self.docs += 1
        return self._h.hexdigest()

    @classmethod
    def of_prefix(cls, corpus: Corpus, n: int, progress: bool = False) -> "Fingerprint | None":
        """The fingerprint of the first ``n`` records of ``corpus`` (None if it has fewer)."""
        from tqdm.auto import tqdm

        fp = cls()
        if n > 0:
            with tqdm(total=n, unit="doc", desc="gradsae score: checking the documents read", disable=not progress,
                      file=sys.stderr, leave=False) as bar:
                for i, text in corpus.records(0):
                    fp.add(text)
                    bar.update(1)
                    if i + 1 >= n:
                        break
        if fp.read < n:
            return None
        fp.upto(n)
        return fp

    def tap(self, corpus: Corpus) -> Corpus:
        """``corpus`` with every record it yields added to this fingerprint."""
        return _Tapped(corpus, self)


class _Tapped(Corpus):
    def __init__(self, inner: Corpus, fp: Fingerprint):
        self.inner, self.fp = inner, fp
        self.format = inner.format

    def records(self, start: int = 0):
        if start != self.fp.read:
            raise ValueError(f"a fingerprinted corpus must be read on from record {self.fp.read}, not {start}")
        for i, text in self.inner.records(start):
            self.fp.add(text)
            yield i, text

    def __len__(self) -> int:
        return len(self.inner)

    def describe(self) -> dict:
        return self.inner.describe()


# ---------------------------------------------------------------------------- state
@dataclass
class RunState:
    """Where a rank stands: the next batch to score and the cursor where it starts, the counts
    of what was scored, the seconds spent, the run's configuration record, and the fingerprint
    of the records before the cursor."""

    next_batch: int = 0
    cursor: Cursor = Cursor(0, 0)
    counts: dict = field(default_factory=lambda: {"documents": 0, "sequences": 0, "batches": 0})
    elapsed: float = 0.0
    config: dict = field(default_factory=dict)
    fingerprint: str = ""
    rank: int = 0
    world_size: int = 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["cursor"] = list(self.cursor)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["cursor"] = Cursor(*d["cursor"])
        known["counts"] = {k: int(v) for k, v in d["counts"].items()}
        return cls(**known)


def save_checkpoint(path, stats, examples, state: RunState) -> None:
    """Write one rank's checkpoint atomically. ``stats`` and ``examples``: a
    :class:`LatentStats` and a :class:`TopExamples`, or (a run with several SAEs) ``{hook:
    LatentStats}`` and ``{hook: TopExamples}``, stored under ``h<i>.`` prefixes with the hooks
    in the state."""
    extra = {}
    if isinstance(stats, dict):
        hooks = list(stats)
        tensors = {}
        for i, h in enumerate(hooks):
            tensors.update({f"h{i}.stats." + k: v.detach().cpu().contiguous() for k, v in stats[h].to_dict().items()})
            tensors.update({f"h{i}." + k: v.detach().cpu().contiguous() for k, v in examples[h].to_dict().items()})
        extra = {"hooks": hooks, "tokens": stats[hooks[0]].tokens}
    else:
        tensors = {"stats." + k: v.detach().cpu().contiguous() for k, v in stats.to_dict().items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in examples.to_dict().items()})
        extra = {"tokens": stats.tokens}
    meta = {"format": FORMAT, "version": str(VERSION),
            "state": json.dumps({**state.to_json(), **extra}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))


def _unpack(tensors: dict, prefix: str, tokens: int, device) -> tuple[LatentStats, TopExamples]:
    d_sae = tensors[prefix + "stats.count"].shape[0]
    stats = LatentStats(d_sae, device=device, dtype=tensors[prefix + "stats.act_sum"].dtype)
    stats.tokens = int(tokens)
    for k in FIELDS:
        setattr(stats, k, tensors[prefix + "stats." + k].to(device))
    ex = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(prefix + "stats.")}
    return stats, TopExamples.from_dict(ex, device=device)


def load_checkpoint(path, device="cpu") -> tuple:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(stats, examples, state)``
    (for a run with several SAEs, ``stats`` and ``examples`` are ``{hook: ...}``)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a gradsae corpus checkpoint")
    if meta.get("version") != str(VERSION):
        raise InputError(f"{path}: a checkpoint of another gradsae version (format {meta.get('version')}, "
                         f"this one reads {VERSION}); start over with overwrite=True (CLI: --overwrite)")
    raw = json.loads(meta["state"])
    try:
        if "hooks" in raw:
            parts = {h: _unpack(tensors, f"h{i}.", raw["tokens"], device) for i, h in enumerate(raw["hooks"])}
            return ({h: p[0] for h, p in parts.items()}, {h: p[1] for h, p in parts.items()},
                    RunState.from_json(raw))
        stats, examples = _unpack(tensors, "", raw["tokens"], device)
    except KeyError as e:
        raise InputError(f"{path}: an incomplete checkpoint (no {e.args[0]!r})") from None
    return stats, examples, RunState.from_json(raw)


def config_diff(saved: dict, now: dict) -> list[str]:
    """The settings (keys of two configuration records) that differ, ignoring those a
    resumed run may change (:attr:`RunConfig.VOLATILE`)."""
    keys = (set(saved) | set(now)) - set(RunConfig.VOLATILE)
    return sorted(k for k in keys if saved.get(k) != now.get(k))


def restore(path, config: dict, corpus: Corpus, out, device="cpu", progress: bool = False):
    """Load the checkpoint at ``path`` for a run whose configuration record is ``config`` on
    ``corpus``: ``(stats, examples, state, fingerprint)``, the fingerprint standing at the
    state's cursor, ready to go on reading. Raises :class:`InputError` if the settings differ
    or the documents before the cursor are not those the run had read (``progress``: a bar
    while they are read again)."""
    stats, examples, state = load_checkpoint(path, device=device)
    diff = config_diff(state.config, config)
    if diff:
        raise InputError(f"cannot resume {out}: the run was started with different settings ({', '.join(diff)}); "
                         "use the same settings, or overwrite=True (CLI: --overwrite) to start over")
    fp = Fingerprint.of_prefix(corpus, state.cursor.doc, progress=progress)
    if fp is None or fp.upto(state.cursor.doc) != state.fingerprint:
        raise InputError(
            f"cannot resume {out}: the corpus changed since the checkpoint (its first {state.cursor.doc} "
            "documents are not those the run had read); resume on the original data, or overwrite=True "
            "(CLI: --overwrite) to start over")
    return stats, examples, state, fp


class Checkpointer:
    """When and where one rank writes its checkpoints: after ``every`` batches scored and/or
    ``interval`` seconds since the last one. ``saved``: the state of the last checkpoint
    written (or restored) in this session."""

    def __init__(self, path: Path | None, every: int | None, interval: float | None, now: float):
        self.path, self.every, self.interval = path, every, interval
        self.last_time, self.since = now, 0
        self.saved: RunState | None = None

    def due(self, now: float) -> bool:
        if self.path is None or self.since == 0:
            return False
        return bool((self.every and self.since >= self.every)
                    or (self.interval is not None and now - self.last_time >= self.interval))

    def save(self, stats, examples, state: RunState, now: float) -> None:
        save_checkpoint(self.path, stats, examples, state)
        self.saved, self.last_time, self.since = state, now, 0

    def describe_kept(self) -> str:
        """Words for what a user can resume from."""
        if self.path is not None and self.path.is_file():
            st = self.saved
            n = st.counts["batches"] if st is not None else 0
            done = f" ({n} batch{'es' * (n != 1)}, up to document {st.cursor.doc})" if st is not None else ""
            return f"the last checkpoint{done} is kept in {self.path.parent}"
        return "no checkpoint had been written yet"


__all__ = [
    "Checkpointer", "Fingerprint", "HOOKS_DIR", "hook_dir", "RunIOError", "RunInterrupted", "RunState", "check_out_dir", "checkpoint_path",
    "clear", "config_diff", "drop_leftovers", "load_checkpoint", "probe_writable", "remove_outputs", "restore",
    "save_checkpoint",
]
