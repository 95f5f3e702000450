"""The process groups DeepSpeed asks an `mpu` for, over InternEvo's rank layout (evods.parallel.layout).

DeepSpeed's own PipelineParallelGrid already builds every group from a ProcessTopology; this adds the tensor-parallel
names its helpers (and Megatron-style code) look for. Traps: the grid's "model parallel"
group is pipe × tensor, the tensor group is the grid's slice group. With pipeline size 1 the two are the same, which
is what ZeRO-1 needs from `mpu` for a plain module; a PipelineModule builds its own grid from the same topology.
"""
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, ProcessTopology

from .layout import ParallelLayout


class ParallelGrid(PipelineParallelGrid):
    def get_tensor_model_parallel_group(self):
        return self.get_slice_parallel_group()


def build_process_topology(layout: ParallelLayout) -> ProcessTopology:
    """DeepSpeed's topology of `layout`: row-major over ["data", "pipe", "model"] is InternEvo's rank numbering."""
    return ProcessTopology(axes=["data", "pipe", "model"], dims=[layout.dp, layout.pp, layout.tp])


def build_parallel_grid(layout: ParallelLayout) -> ParallelGrid:
    """Every rank must call this, in the same order as its other group creations (torch.distributed.new_group)."""
    grid = ParallelGrid(topology=build_process_topology(layout))
    placed = (grid.get_data_parallel_rank(), grid.get_pipe_parallel_rank(), grid.get_tensor_model_parallel_rank())
    if placed != (layout.dp_rank, layout.pp_rank, layout.tp_rank):
        raise RuntimeError(f"DeepSpeed placed rank {grid.get_global_rank()} at (dp, pp, tp) = {placed}, but "
                           f"InternEvo's layout gives {(layout.dp_rank, layout.pp_rank, layout.tp_rank)}")
    return grid
