"""Crash-safe checkpoints of a corpus run.

One file per rank, ``<out>/checkpoint/rank<r>-of<w>.safetensors``, holds everything the rank
needs to go on: the :class:`LatentStats` tensors, the :class:`TopExamples` tables, and a JSON
state (the data cursor of the next batch, counters, the run's configuration). It is written
to a temporary file in the same directory, flushed to disk, and renamed over the old one, so
a kill at any instant (SIGKILL included) leaves either the previous or the new checkpoint,
never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_write, save_safetensors
from ..stats import SUM_FIELDS, LatentStats
from .examples import TopExamples

FORMAT = "gradsae.corpus.checkpoint"
VERSION = 1


def checkpoint_path(out, rank: int, world_size: int) -> Path:
    return Path(out) / "checkpoint" / f"rank{rank}-of{world_size}.safetensors"


def save_checkpoint(path, stats: LatentStats, examples: TopExamples, state: dict) -> None:
    """Write one rank's checkpoint atomically."""
    tensors = {"stats." + k: v.detach().cpu().contiguous() for k, v in stats.to_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in examples.to_dict().items()})
    meta = {"format": FORMAT, "version": str(VERSION), "state": json.dumps({**state, "tokens": stats.tokens})}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))


def load_checkpoint(path, device="cpu") -> tuple[LatentStats, TopExamples, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(stats, examples, state)``."""
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
    state = json.loads(meta["state"])
    d_sae = tensors["stats.count"].shape[0]
    stats = LatentStats(d_sae, device=device, dtype=tensors["stats.act_sum"].dtype)
    stats.tokens = int(state["tokens"])
    for k in ("count", "score_max", *SUM_FIELDS):
        setattr(stats, k, tensors["stats." + k].to(device))
    examples = TopExamples.from_dict(tensors, device=device)
    return stats, examples, state
