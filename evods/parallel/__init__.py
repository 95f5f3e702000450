"""Data × pipeline × tensor topology (InternEvo's rank layout) and the pieces DeepSpeed needs from it."""
from .topology import ParallelSizes, build_process_topology, parallel_sizes

__all__ = ["ParallelSizes", "build_process_topology", "parallel_sizes"]
