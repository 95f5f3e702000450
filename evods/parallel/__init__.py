"""The parallel layout (data × pipeline × tensor, InternEvo's rank numbering), the process groups DeepSpeed needs
from it, and tensor, sequence and Ulysses (isp) parallelism applied to a plain model from outside."""
from .layout import ParallelLayout, parallel_layout
from .loss_vocab_parallel import VocabParallelLogits, vocab_parallel_argmax, vocab_parallel_cross_entropy
from .pipeline_stages import (
    DecoderStage,
    EmbeddingStage,
    HeadStage,
    pipeline_layer_index,
    pipeline_layers,
    pipeline_parameter_name,
    stage_layers,
)
from .plan import TENSOR_PARALLEL_PLAN, TensorParallelSplit, apply_tensor_parallel, gather_tensor_parallel_state_dict
from .rng import parallel_seeds, tensor_parallel_generator
from .ulysses import apply_ulysses

__all__ = [
    "DecoderStage",
    "EmbeddingStage",
    "HeadStage",
    "ParallelGrid",
    "ParallelLayout",
    "TENSOR_PARALLEL_PLAN",
    "TensorParallelSplit",
    "VocabParallelLogits",
    "apply_tensor_parallel",
    "apply_ulysses",
    "build_parallel_grid",
    "build_process_topology",
    "gather_tensor_parallel_state_dict",
    "parallel_seeds",
    "parallel_layout",
    "pipeline_layer_index",
    "pipeline_layers",
    "pipeline_parameter_name",
    "stage_layers",
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
