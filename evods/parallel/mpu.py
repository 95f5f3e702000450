"""The process groups DeepSpeed asks an `mpu` for, over InternEvo's rank layout (evods.parallel.layout).

DeepSpeed's own PipelineParallelGrid already builds every group from a ProcessTopology; this adds the tensor-parallel
names its helpers (and Megatron-style code) look for. Traps: the grid's "model parallel"
group is pipe × tensor, the tensor group is the grid's slice group. With pipeline size 1 the two are the same, which
is what ZeRO-1 needs from `mpu` for a plain module; a PipelineModule builds its own grid from the same topology.

Under isp (`layout.sp` > 1) the sp ranks of a row at a pipeline stage hold the same weights, so DeepSpeed's "data"
axis is all dp × sp ranks (its data-parallel group averages their gradients, ZeRO shards over them); `LayoutTopology`
keeps the isp ranks consecutive in the global numbering all the same. The isp group of each row is built beside the
grid. The grid does not name it `get_sequence_parallel_group`: DeepSpeed reads that name (deepspeed/utils/groups.py)
to run its own sequence-data-parallel gradient averaging, which evods does not ask for (the loss carries the scaling,
ulysses.py).
"""
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, ProcessTopology

from .layout import ParallelLayout


class ParallelGrid(PipelineParallelGrid):
    ulysses_group = None  # the isp ranks of this rank's row (layout.sp > 1), set by build_parallel_grid

    def get_tensor_model_parallel_group(self):
        return self.get_slice_parallel_group()

    def get_ulysses_group(self):
        return self.ulysses_group


class LayoutTopology(ProcessTopology):
    """DeepSpeed's topology over the axes ["data", "pipe", "model"] with InternEvo's rank numbering (`layout`), where
    the data coordinate is the ZeRO rank (dp × the isp ranks). Without isp that numbering is ProcessTopology's own
    row-major one. With isp and a pipeline it is not: the isp ranks of a stage are consecutive (their all-to-alls stay
    inside a node) while DeepSpeed counts them as data ranks, an axis outside the pipeline's. Every DeepSpeed group
    and lookup (PipelineParallelGrid, PipelineModule's tied weights) goes through `mapping`, so a permuted mapping is
    all it takes."""

    def __init__(self, layout: ParallelLayout):
        super().__init__(axes=["data", "pipe", "model"], dims=[layout.zero_ranks, layout.pp, layout.tp])
        placed = (layout.at(rank) for rank in range(layout.world))
        self.mapping = {self.ProcessCoord(data=at.zero_rank, pipe=at.pp_rank, model=at.tp_rank): at.rank
                        for at in placed}


def build_process_topology(layout: ParallelLayout) -> ProcessTopology:
    """DeepSpeed's topology of `layout` (InternEvo's rank numbering)."""
    return LayoutTopology(layout)


def build_parallel_grid(layout: ParallelLayout) -> ParallelGrid:
    """Every rank must call this, in the same order as its other group creations (torch.distributed.new_group)."""
    grid = ParallelGrid(topology=build_process_topology(layout))
    placed = (grid.get_data_parallel_rank(), grid.get_pipe_parallel_rank(), grid.get_tensor_model_parallel_rank())
    if placed != (layout.zero_rank, layout.pp_rank, layout.tp_rank):
        raise RuntimeError(f"DeepSpeed placed rank {grid.get_global_rank()} at (data, pp, tp) = {placed}, but "
                           f"InternEvo's layout gives {(layout.zero_rank, layout.pp_rank, layout.tp_rank)}")
    if layout.sp > 1:
        # the isp ranks of a row at one pipeline stage are consecutive; every rank creates every group, in order
        for block in range(layout.world // layout.sp):
            group = dist.new_group(list(range(block * layout.sp, (block + 1) * layout.sp)))
            if block == layout.rank // layout.sp:
                grid.ulysses_group = group
    return grid
