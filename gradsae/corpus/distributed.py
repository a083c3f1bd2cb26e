"""Multi-process corpus runs over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Launch with torchrun (``torchrun --nproc-per-node N -m gradsae score ...``, multi-node through
its rendezvous): the process group is created from the environment torchrun sets. Batches are
dealt round-robin (batch ``i`` to rank ``i % world_size``), so each batch is computed exactly
as in a single-process run; at the end the statistics are all-reduced (sums, max) and the
top-example tables gathered and merged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..stats import SUM_FIELDS, LatentStats
from .examples import FIELDS, TopExamples


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group (and destroy it at the end)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def context_from_env(device: str | torch.device | None = None) -> DistContext:
    """Join (or create from torchrun's environment) the default process group. Without
    ``WORLD_SIZE`` > 1 and no existing group, a single-process context."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else None
    use_nccl = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    if use_nccl:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


def all_reduce_stats(ctx: DistContext, stats: LatentStats) -> LatentStats:
    """Sum counts, sums and tokens, max the maxima, over all ranks (in place)."""
    import torch.distributed as dist

    if not ctx.active:
        return stats
    dev = ctx.comm_device()

    def red(t, op):
        x = t.to(dev)
        dist.all_reduce(x, op=op)
        return x.to(t.device)

    stats.count = red(stats.count, dist.ReduceOp.SUM)
    for f in SUM_FIELDS:
        setattr(stats, f, red(getattr(stats, f), dist.ReduceOp.SUM))
    stats.score_max = red(stats.score_max, dist.ReduceOp.MAX)
    stats.tokens = int(red(torch.tensor([stats.tokens], dtype=torch.int64), dist.ReduceOp.SUM).item())
    return stats


def all_reduce_counts(ctx: DistContext, values: dict[str, int]) -> dict[str, int]:
    """Sum integer counters over all ranks."""
    import torch.distributed as dist

    if not ctx.active:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.int64, device=ctx.comm_device())
    dist.all_reduce(t)
    return {k: int(v) for k, v in zip(keys, t.tolist())}


def all_reduce_max(ctx: DistContext, value: float) -> float:
    """The largest ``value`` over all ranks."""
    import torch.distributed as dist

    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_examples(ctx: DistContext, ex: TopExamples) -> TopExamples:
    """Every rank's tables merged (identical on all ranks; order-independent by design)."""
    import torch.distributed as dist

    if not ctx.active:
        return ex
    dev = ctx.comm_device()
    parts = {}
    for f in FIELDS:
        t = getattr(ex, f).to(dev).contiguous()
        bufs = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(bufs, t)
        parts[f] = bufs
    out = TopExamples(ex.d_sae, ex.n, ex.context, device=ex.device)
    for r in range(ctx.world_size):
        out.merge(TopExamples.from_dict({"examples." + f: parts[f][r] for f in FIELDS}, device=ex.device))
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    import torch.distributed as dist

    if not ctx.active:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=ctx.comm_device())
    dist.broadcast(t, 0)
    return bool(t.item())
