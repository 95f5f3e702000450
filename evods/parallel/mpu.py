"""The process groups DeepSpeed asks an `mpu` for, over InternEvo's rank layout (evods.parallel.layout).

DeepSpeed's own PipelineParallelGrid already builds every group from a ProcessTopology; this adds the tensor-parallel
names its helpers (and Megatron-style code) look for. Traps: the grid's "model parallel"
group is pipe × tensor, the tensor group is the grid's slice group. With pipeline size 1 the two are the same, which
is what ZeRO-1 needs from `mpu` for a plain module; a PipelineModule builds its own grid from the same topology.

Under isp (`layout.sp` > 1, pipeline size 1) the sp ranks of a row hold the same weights, so DeepSpeed's "data" axis
is all dp × sp ranks (its data-parallel group averages their gradients, ZeRO shards over them); with the isp ranks
consecutive that axis is the global rank itself. The isp group of each row is built beside the grid. The grid does
not name it `get_sequence_parallel_group`: DeepSpeed reads that name (deepspeed/utils/groups.py) to run its own
sequence-data-parallel gradient averaging, which evods does not ask for (the loss carries the scaling, ulysses.py).
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


def build_process_topology(layout: ParallelLayout) -> ProcessTopology:
    """DeepSpeed's topology of `layout`: row-major over ["data", "pipe", "model"] is InternEvo's rank numbering; the
    isp ranks count as data ranks (config validation keeps isp to pipeline size 1, where that numbering holds)."""
    if layout.sp > 1 and layout.pp > 1:
        raise ValueError(f"isp size {layout.sp} with pipeline size {layout.pp}: evods runs isp without a pipeline")
    return ProcessTopology(axes=["data", "pipe", "model"], dims=[layout.zero_ranks, layout.pp, layout.tp])


def build_parallel_grid(layout: ParallelLayout) -> ParallelGrid:
    """Every rank must call this, in the same order as its other group creations (torch.distributed.new_group)."""
    grid = ParallelGrid(topology=build_process_topology(layout))
    placed = (grid.get_data_parallel_rank(), grid.get_pipe_parallel_rank(), grid.get_tensor_model_parallel_rank())
    if placed != (layout.zero_rank, layout.pp_rank, layout.tp_rank):
        raise RuntimeError(f"DeepSpeed placed rank {grid.get_global_rank()} at (data, pp, tp) = {placed}, but "
                           f"InternEvo's layout gives {(layout.zero_rank, layout.pp_rank, layout.tp_rank)}")
    if layout.sp > 1:
        for row in range(layout.world // layout.sp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(row * layout.sp, (row + 1) * layout.sp)))
            if row == layout.rank // layout.sp:
                grid.ulysses_group = group
    return grid
