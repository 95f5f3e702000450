"""A model of which this rank materialises only its part, for a start whose checkpoint gives every weight (an HF
folder, read rank by rank: formats/hf_start.py).

The model is built on the meta device (shapes, no memory), tensor parallelism splits it there, and only what the
rank holds (`RankPart`: its tensor slices, its pipeline stage's parameters) gets memory, on the host in the model's
dtype, left empty for the checkpoint to fill; the parameters of other stages stay on the meta device, where any use
of them fails instead of computing on garbage. The RoPE tables, which no checkpoint holds, are recomputed as the
model's `__init__` computes them. A whole model per rank would be built and then sliced otherwise: the whole weights
and the slices held at once (BENCHMARKS.md, "Starting from a sharded Hugging Face Llama folder").
"""
import torch
from torch import nn

from evods.checkpoint.formats.hf_start import RankPart
from evods.checkpoint.formats.weights import TIED_EMBEDDING, TIED_HEAD
from evods.model.modeling_internlm import InternLMRotaryEmbedding
from evods.parallel import apply_tensor_parallel

HOST = torch.device("cpu")  # where the plain build puts the model too; DeepSpeed moves it to the accelerator


def materialise_rank_part(model: nn.Module, rank: RankPart, tp_group, embed_split_hidden: bool,
                          parallel_output: bool, sequence_parallel: bool) -> nn.Module:
    """Split the meta-device `model` with tensor parallelism (as `apply_tensor_parallel`) and give memory to the
    parameters `rank` holds: the slices as the tensor-parallel modules take them, the rest (norms, or everything at
    tensor size 1) before the split, so that the hooks and marks the split puts on them stay theirs."""
    tied = (TIED_EMBEDDING, TIED_HEAD) if model.config.tie_word_embeddings else ()

    def holds(name: str) -> bool:  # a tied weight: one tensor, which both its stages hold (DeepSpeed's TiedLayerSpec)
        return any(rank.holds(one) for one in tied) if name in tied else rank.holds(name)

    split_modules = {name for name, _ in model.named_modules() if rank.split.tp_size > 1 and rank.split.style(name)}
    materialised: dict[int, nn.Parameter] = {}  # a tied parameter is one tensor
    for module_name, module in model.named_modules():
        if module_name in split_modules:
            continue
        for leaf, param in list(module.named_parameters(recurse=False)):
            if id(param) not in materialised and holds(f"{module_name}.{leaf}".lstrip(".")):
                materialised[id(param)] = nn.Parameter(torch.empty_like(param, device=HOST),
                                                       requires_grad=param.requires_grad)
            if id(param) in materialised:
                setattr(module, leaf, materialised[id(param)])
    apply_tensor_parallel(model, tp_group, rank.tp_rank, rank.split.tp_size, embed_split_hidden, parallel_output,
                          sequence_parallel=sequence_parallel,
                          materialise=lambda name, part: torch.empty_like(part, device=HOST) if holds(name)
                          else part)
    for module in model.modules():
        if isinstance(module, InternLMRotaryEmbedding):
            module.to_empty(device=HOST, recurse=False)
            module.reset_inv_freq()
    on_meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if on_meta:
        raise ValueError(f"the model's buffers {on_meta} are not in the checkpoint and evods does not know how to "
                         "compute them: start with the whole model built instead")
    return model


def parameter_bytes(model: nn.Module) -> int:
    """The bytes of the parameters that have memory on this rank (a tied one once)."""
    return sum(param.numel() * param.element_size() for param in model.parameters() if not param.is_meta)
