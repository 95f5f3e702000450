"""The parallel layout of a run: how its processes split into data × pipeline × tensor parallel groups, which
parallel modes apply, and where one rank sits in it.

One `ParallelLayout` is decided per run, from the config and the world size (`evods.config.check_topology`), and
handed to everything that depends on it: the process groups, the DeepSpeed config, the loss, checkpoints, logs. A
decision about parallelism (a ZeRO stage, another sequence-parallel mode, adapters) is a field here, set in that
one place, so that no part of evods derives it again from the config.

InternEvo numbers ranks as ``global_rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank`` (tensor ranks consecutive,
so a tensor group stays inside a node). DeepSpeed's ProcessTopology is row-major over its axes, so the axes
``["data", "pipe", "model"]`` give exactly that layout (`evods.parallel.mpu`).

Under InternEvo's isp (Ulysses sequence parallelism, `evods.parallel.ulysses`) the `sp` ranks of a row take the
tensor ranks' place: ``global_rank = dp_rank * (pp * sp) + pp_rank * sp + sp_rank``, and tp is 1 (no weight is split).
Those ranks hold the same weights and see the same rows, so ZeRO and DeepSpeed's data-parallel group span dp × sp
ranks (`zero_ranks`), while the data is split over dp ranks only.
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
    # InternEvo's isp: the ranks that share each packed row, each holding 1/sp of its tokens (tp is 1 then).
    sp: int = 1
    # DeepSpeed's ZeRO over the data-parallel ranks: 1 shards the optimizer states, 2 the gradients too, 3 the
    # parameters too (config parallel.zero, or InternEvo's zero1.fsdp=True); the offloads keep the fp32 optimizer
    # shards (stage 2/3) and the parameter shards (stage 3) in host memory.
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    rank: int = 0  # the global rank this layout is seen from; the *_rank properties place it

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp * self.sp

    @property
    def _row_width(self) -> int:
        """The consecutive ranks of one stage of one row: the tensor ranks, or the isp ranks (one of the two is 1)."""
        return self.tp * self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.pp * self._row_width)

    @property
    def pp_rank(self) -> int:
        return (self.rank // self._row_width) % self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def sp_rank(self) -> int:
        return self.rank % self._row_width // self.tp

    @property
    def zero_ranks(self) -> int:
        """The ranks that hold the same weights of a stage: those ZeRO shards over, DeepSpeed's data-parallel group."""
        return self.dp * self.sp

    @property
    def zero_rank(self) -> int:
        return self.dp_rank * self.sp + self.sp_rank

    @property
    def is_log_rank(self) -> bool:
        """InternEvo logs from data rank 0, tensor (or isp) rank 0, last pipeline stage: the rank that sees the
        loss."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.sp_rank == 0 and self.pp_rank == self.pp - 1

    def at(self, rank: int) -> "ParallelLayout":
        """The same layout seen from another rank."""
        return replace(self, rank=rank)


def parallel_layout(rank: int, world_size: int, pp: int, tp: int, sp: int = 1, **modes) -> ParallelLayout:
    """Place `rank` in InternEvo's layout of `world_size` processes; the caller has checked that pp * tp * sp divides
    world_size (a training config: `evods.config.check_topology`, which also decides the `modes`, the layout's
    other fields)."""
    if tp > 1 and sp > 1:
        raise ValueError(f"tensor size {tp} with isp size {sp}: isp splits no weight, so one of the two must be 1")
    return ParallelLayout(dp=world_size // (pp * tp * sp), pp=pp, tp=tp, sp=sp, rank=rank, **modes)
