"""The torch.distributed glue of a run: which rank this is, rank-0-only steps whose errors reach every
rank, and the sums of the ranks' statistics. Without an initialised process group: rank 0 of 1."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from vqdna.streaming.settings import TokenizeError

__all__ = ["all_ranks_ok", "distributed", "from_rank0", "on_rank0", "sum_over_ranks"]


def distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(fn, rank: int, world: int):
    """Run fn() on rank 0; its error (TokenizeError/OSError) is raised on every rank (a collective:
    every rank calls this). Returns fn()'s result on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (TokenizeError, OSError) as exc:
            error = exc
    message = None if error is None else str(error)
    if world > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise TokenizeError(message)
    return result


def from_rank0(fn, rank: int, world: int):
    """fn() computed on rank 0 only and broadcast to every rank (a collective: every rank calls this).
    Its error (any Exception: e.g. a FastaFormatError while planning) is raised on rank 0 as it is and
    on the other ranks as a TokenizeError with its message."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (re-raised below, after every rank learnt of it)
            error = exc
    if world > 1:
        import torch.distributed as dist

        box = [(result, None if error is None else str(error))]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if error is None and message is not None:
            raise TokenizeError(message)
    if error is not None:
        raise error
    return result


def all_ranks_ok(failure: Optional[BaseException], rank: int, world: int) -> None:
    """Every rank learns whether any rank failed (a collective); the failing rank re-raises its own."""
    errors = [None if failure is None else f"rank {rank}: {failure}"]
    if world > 1:
        import torch.distributed as dist

        errors = [None] * world
        dist.all_gather_object(errors, None if failure is None else f"rank {rank}: {failure}")
    if failure is not None:
        raise failure
    if any(errors):
        raise TokenizeError("; ".join(e for e in errors if e))


def sum_over_ranks(stats, dev: torch.device) -> None:
    import torch.distributed as dist

    sizes = [len(u) for u in stats.usage]
    counts = ("records", "bases", "encoded_bases", "encoded_positions", "copied_records", "shards_written", "shards_skipped")
    totals = torch.tensor([getattr(stats, k) for k in counts], dtype=torch.int64)
    usage = torch.from_numpy(np.concatenate(stats.usage))
    if dist.get_backend() == "nccl":
        totals, usage = totals.to(dev), usage.to(dev)
    dist.all_reduce(totals)
    dist.all_reduce(usage)
    for k, v in zip(counts, totals.cpu()):
        setattr(stats, k, int(v))
    stats.usage = list(np.split(usage.cpu().numpy(), np.cumsum(sizes)[:-1]))
    redone = [None] * dist.get_world_size()
    dist.all_gather_object(redone, stats.redone)
    stats.redone = [line for lines in redone for line in lines]
