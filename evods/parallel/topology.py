"""The dp × pp × tp process layout.

InternEvo numbers ranks as ``global_rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank`` (tensor ranks consecutive,
so a tensor group stays inside a node). DeepSpeed's ProcessTopology is row-major over its axes, so the axes
``["data", "pipe", "model"]`` give exactly that layout, and DeepSpeed's PipelineParallelGrid builds its groups from it.
"""
from dataclasses import dataclass

from deepspeed.runtime.pipe.topology import ProcessTopology


@dataclass(frozen=True)
class ParallelSizes:
    dp: int
    pp: int
    tp: int
    dp_rank: int
    pp_rank: int
    tp_rank: int
    zero_stage: int = 1  # DeepSpeed's ZeRO stage over the data-parallel ranks (config parallel.zero, schema)

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def is_log_rank(self) -> bool:
        """InternEvo logs from data rank 0, tensor rank 0, last pipeline stage: the rank that sees the loss."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == self.pp - 1


def parallel_sizes(rank: int, world_size: int, pp: int, tp: int, zero_stage: int = 1) -> ParallelSizes:
    """Place `rank` in the InternEvo layout; the caller has validated that pp * tp divides world_size."""
    dp = world_size // (pp * tp)
    return ParallelSizes(dp=dp, pp=pp, tp=tp, dp_rank=rank // (pp * tp), pp_rank=(rank // tp) % pp, tp_rank=rank % tp,
                         zero_stage=zero_stage)


def build_process_topology(sizes: ParallelSizes) -> ProcessTopology:
    return ProcessTopology(axes=["data", "pipe", "model"], dims=[sizes.dp, sizes.pp, sizes.tp])
