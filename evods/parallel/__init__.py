"""Data × pipeline × tensor topology (InternEvo's rank layout) and the pieces DeepSpeed needs from it."""
from .cross_entropy import VocabParallelLogits, vocab_parallel_argmax, vocab_parallel_cross_entropy
from .mpu import ParallelGrid, build_parallel_grid
from .pipeline_stages import DecoderStage, EmbeddingStage, HeadStage, pipeline_layers, pipeline_parameter_name
from .plan import TENSOR_PARALLEL_PLAN, TensorParallelSplit, apply_tensor_parallel, gather_tensor_parallel_state_dict
from .rng import parallel_seeds, tensor_parallel_generator
from .topology import ParallelSizes, build_process_topology, parallel_sizes

__all__ = [
    "DecoderStage",
    "EmbeddingStage",
    "HeadStage",
    "ParallelGrid",
    "ParallelSizes",
    "TENSOR_PARALLEL_PLAN",
    "TensorParallelSplit",
    "VocabParallelLogits",
    "apply_tensor_parallel",
    "build_parallel_grid",
    "build_process_topology",
    "gather_tensor_parallel_state_dict",
    "parallel_seeds",
    "parallel_sizes",
    "pipeline_layers",
    "pipeline_parameter_name",
    "tensor_parallel_generator",
    "vocab_parallel_argmax",
    "vocab_parallel_cross_entropy",
]
