"""The few collectives checkpointing needs, and a guard so that an error on one rank stops every rank."""
import tempfile
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import FailedOnAnotherRank

T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(value) -> list:
    """Every rank's `value` (a small picklable object), in rank order."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value):
    """Rank 0's `value` (a small picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(what: str, work: Callable[[], T]) -> T:
    """`work` run on rank 0 alone and its result shared with every rank: reads of the storage whose answer every
    rank needs (which checkpoint to load, its file list) cost one request each, not one per rank."""
    return broadcast(agree_on_failure(what, lambda: work() if rank() == 0 else None))


def node_scratch_folder(nodes, kind: str) -> str:
    """A scratch folder (evods.storage.scratch) that the node's leader makes and every rank of its node `nodes`
    (an evods.parallel.nodes.NodeLayout) shares."""
    from evods.storage import make_scratch_folder

    made = agree_on_failure(f"creating a {kind} folder in {tempfile.gettempdir()}",
                            lambda: make_scratch_folder(kind) if nodes.is_leader else None)
    return all_gather(made)[nodes.leader]


def agree_on_failure(what: str, work: Callable[[], T],
                     on_failure: Callable[[BaseException], None] | None = None) -> T:
    """Run `work` on this rank; if it fails on any rank, every rank raises. `on_failure` hears of this rank's own
    error (not of the ones it raises because another rank failed).

    The first rank that failed raises its own error; every other rank raises FailedOnAnotherRank, which carries that
    error's message and which commands do not print, so a job reports a failure once. Without this, ranks whose part
    succeeded would wait in the next collective until the process-group timeout (30 minutes) while the failing rank
    has already exited. Doubles as a barrier.
    """
    error, result = None, None
    try:
        result = work()
    except Exception as exc:  # re-raised below, after every rank knows
        error = exc
        if on_failure is not None:
            on_failure(error)
    first_failed = torch.tensor([world_size() if error is None else rank()])
    if dist.is_initialized():
        dist.all_reduce(first_failed, op=dist.ReduceOp.MIN)
    first = int(first_failed.item())
    if first == world_size():
        return result
    reasons = all_gather(None if error is None else str(error).splitlines()[0] if str(error) else type(error).__name__)
    if first == rank():
        raise error
    raise FailedOnAnotherRank(what, f"rank {first}: {reasons[first]}") from error
