"""The few collectives checkpointing needs, and a guard so that an error on one rank stops every rank."""
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import CheckpointError

T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def agree_on_failure(what: str, work: Callable[[], T],
                     on_failure: Optional[Callable[[BaseException], None]] = None) -> T:
    """Run `work` on this rank; if it fails on any rank, every rank raises. `on_failure` hears of this rank's own
    error (not of the ones it raises because another rank failed).

    Without this, ranks whose part succeeded would wait in the next collective until the process-group timeout
    (30 minutes) while the failing rank has already exited. Doubles as a barrier.
    """
    error, result = None, None
    try:
        result = work()
    except Exception as exc:  # re-raised below, after every rank knows
        error = exc
        if on_failure is not None:
            on_failure(error)
    failed = torch.tensor([0 if error is None else 1])
    if dist.is_initialized():
        dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise CheckpointError(f"{what} failed on another rank (its error is in that rank's log); stopping here too")
    return result
