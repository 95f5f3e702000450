"""The parallel layout of a run: how its processes split into data × pipeline × tensor parallel groups, which
parallel modes apply, and where one rank sits in it.

One `ParallelLayout` is decided per run, from the config and the world size (`evods.config.check_topology`), and
handed to everything that depends on it: the process groups, the DeepSpeed config, the loss, checkpoints, logs. A
decision about parallelism (a ZeRO stage, another sequence-parallel mode, adapters) is a field here, set in that
one place, so that no part of evods derives it again from the config.

InternEvo numbers ranks as ``global_rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank`` (tensor ranks consecutive,
so a tensor group stays inside a node). DeepSpeed's ProcessTopology is row-major over its axes, so the axes
``["data", "pipe", "model"]`` give exactly that layout (`evods.parallel.mpu`).
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ParallelLayout:
    dp: int
    pp: int
    tp: int
    # Megatron sequence parallelism: each tensor rank holds its slice of the tokens between the tensor-parallel
    # layers. Applied, not only asked for: never True with tp == 1.
    sequence_parallel: bool = False
    # DeepSpeed's ZeRO over the data-parallel ranks: 1 shards the optimizer states, 2 the gradients too, 3 the
    # parameters too (config parallel.zero, or InternEvo's zero1.fsdp=True); the offloads keep the fp32 optimizer
    # shards (stage 2/3) and the parameter shards (stage 3) in host memory.
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    rank: int = 0  # the global rank this layout is seen from; the *_rank properties place it

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.pp * self.tp)

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_log_rank(self) -> bool:
        """InternEvo logs from data rank 0, tensor rank 0, last pipeline stage: the rank that sees the loss."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == self.pp - 1

    def at(self, rank: int) -> "ParallelLayout":
        """The same layout seen from another rank."""
        return replace(self, rank=rank)


def parallel_layout(rank: int, world_size: int, pp: int, tp: int, **modes) -> ParallelLayout:
    """Place `rank` in InternEvo's layout of `world_size` processes; the caller has checked that pp * tp divides
    world_size (a training config: `evods.config.check_topology`, which also decides the `modes`, the layout's
    other fields)."""
    return ParallelLayout(dp=world_size // (pp * tp), pp=pp, tp=tp, rank=rank, **modes)
