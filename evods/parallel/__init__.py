"""The parallel layout (data × pipeline × tensor, InternEvo's rank numbering), the process groups DeepSpeed needs
from it, and tensor and sequence parallelism applied to a plain model from outside."""
from .layout import ParallelLayout, parallel_layout
from .loss_vocab_parallel import VocabParallelLogits, vocab_parallel_argmax, vocab_parallel_cross_entropy
from .plan import (
    TENSOR_PARALLEL_PLAN,
    apply_tensor_parallel,
    gather_tensor_parallel_state_dict,
    shard_tensor,
    split_dim,
)
from .rng import parallel_seeds, tensor_parallel_generator

__all__ = [
    "ParallelGrid",
    "ParallelLayout",
    "TENSOR_PARALLEL_PLAN",
    "VocabParallelLogits",
    "apply_tensor_parallel",
    "build_parallel_grid",
    "build_process_topology",
    "gather_tensor_parallel_state_dict",
    "parallel_seeds",
    "parallel_layout",
    "shard_tensor",
    "split_dim",
    "tensor_parallel_generator",
    "vocab_parallel_argmax",
    "vocab_parallel_cross_entropy",
]


def __getattr__(name: str):
    """DeepSpeed's process groups (mpu.py), imported on first use: evods.config reads the layout from this package
    and loads without DeepSpeed."""
    if name in ("ParallelGrid", "build_parallel_grid", "build_process_topology"):
        from . import mpu

        return getattr(mpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
