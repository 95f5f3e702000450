"""Tensor parallelism applied to the Hugging Face InternLM model, from one table of how each weight is split.

`TENSOR_PARALLEL_PLAN` maps HF module names to a shard style; a style says which dim of each of its parameters is
split (None: replicated). The same table slices full weights (`apply_tensor_parallel`, `shard_tensor`) and gathers
them back (`gather_tensor_parallel_state_dict`), so the two cannot disagree. Shards are contiguous chunks along the
split dim, rank t holding chunk t, as InternEvo stores them
(its save_model_checkpoint writes one file per tp rank):
- q/k/v rows are head-major, so chunk t of each is heads [t*H/tp, (t+1)*H/tp). InternEvo's fused `Wqkv` shard t is
  the concatenation [q shard t; k shard t; v shard t] along dim 0, its bias likewise.
- o_proj and down_proj split their input features; their bias (o_proj) is replicated and added after the all-reduce
  (InternEvo stores it on tensor rank 0 only).
- The embedding splits hidden (`embed_split_hidden=True`, InternEvo's `embedding.weight`) or the vocabulary
  (`False`, `embedding.word_embeddings.weight`); lm_head always splits the vocabulary.
- Everything else (the RMSNorm weights) is replicated.
With `sequence_parallel` the same weights are split the same way; `evods.parallel.sequence_parallel` adds the
token slicing around them.
"""
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .layers import ColumnParallelLinear, HiddenParallelEmbedding, RowParallelLinear, VocabParallelEmbedding
from .sequence_parallel import apply_sequence_parallel


@dataclass(frozen=True)
class ShardContext:
    group: object
    rank: int
    parallel_output: bool
    sequence_parallel: bool


@dataclass(frozen=True)
class ShardStyle:
    param_dims: dict  # parameter name in the module -> split dim, None when replicated
    build: Callable[[dict, ShardContext], nn.Module]  # local parameters -> the tensor-parallel module


COLUMN = ShardStyle({"weight": 0, "bias": 0}, lambda p, ctx: ColumnParallelLinear(
    p["weight"], p.get("bias"), ctx.group, sequence_parallel=ctx.sequence_parallel))
ROW = ShardStyle({"weight": 1, "bias": None}, lambda p, ctx: RowParallelLinear(
    p["weight"], p.get("bias"), ctx.group, sequence_parallel=ctx.sequence_parallel))
VOCAB_HEAD = ShardStyle({"weight": 0}, lambda p, ctx: ColumnParallelLinear(
    p["weight"], None, ctx.group, gather_output=not ctx.parallel_output, sequence_parallel=ctx.sequence_parallel))
EMBEDDING_SPLIT_HIDDEN = ShardStyle({"weight": 1}, lambda p, ctx: HiddenParallelEmbedding(p["weight"], ctx.group))
EMBEDDING_SPLIT_VOCAB = ShardStyle({"weight": 0}, lambda p, ctx: VocabParallelEmbedding(
    p["weight"], ctx.group, vocab_start=ctx.rank * p["weight"].shape[0]))

EMBEDDING = r"model\.embed_tokens"
TENSOR_PARALLEL_PLAN = {  # HF module name (full match) -> style; the embedding's style depends on embed_split_hidden
    r"model\.layers\.\d+\.self_attn\.[qkv]_proj": COLUMN,
    r"model\.layers\.\d+\.self_attn\.o_proj": ROW,
    r"model\.layers\.\d+\.mlp\.(gate|up)_proj": COLUMN,
    r"model\.layers\.\d+\.mlp\.down_proj": ROW,
    r"lm_head": VOCAB_HEAD,
}


def module_style(module_name: str, embed_split_hidden: bool) -> ShardStyle | None:
    if re.fullmatch(EMBEDDING, module_name):
        return EMBEDDING_SPLIT_HIDDEN if embed_split_hidden else EMBEDDING_SPLIT_VOCAB
    for pattern, style in TENSOR_PARALLEL_PLAN.items():
        if re.fullmatch(pattern, module_name):
            return style
    return None


def split_dim(param_name: str, embed_split_hidden: bool) -> int | None:
    """The dim along which HF parameter `param_name` is split over tensor ranks; None when every rank holds it all."""
    module_name, _, leaf = param_name.rpartition(".")
    style = module_style(module_name, embed_split_hidden)
    return None if style is None else style.param_dims.get(leaf)


def shard_tensor(param_name: str, full: torch.Tensor, tp_rank: int, tp_size: int, embed_split_hidden: bool):
    """Tensor rank `tp_rank`'s part of the full HF parameter `param_name` (a copy; the full tensor when replicated)."""
    dim = split_dim(param_name, embed_split_hidden)
    if dim is None or tp_size == 1:
        return full.clone()
    if full.shape[dim] % tp_size:
        raise ValueError(f"{param_name} has {full.shape[dim]} entries along dim {dim}, which tensor parallel size "
                         f"{tp_size} does not divide; pick a tensor size that divides it")
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def _mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """The attributes Megatron gives a sharded parameter; DeepSpeed's grad norm counts such a parameter on every
    tensor rank, and a replicated one on tensor rank 0 only."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def apply_tensor_parallel(model: nn.Module, tp_group, tp_rank: int, tp_size: int, embed_split_hidden: bool,
                          parallel_output: bool, sequence_parallel: bool = False) -> nn.Module:
    """Swap the modules named in the plan for tensor-parallel ones holding rank `tp_rank`'s slices of their weights.

    The model is changed in place (and returned); it must hold full weights, e.g. fresh or loaded from HF. With
    `parallel_output` the logits stay split along the vocabulary (use `VocabParallelLogits` for the loss);
    otherwise they are gathered. With `sequence_parallel` the activations between the tensor-parallel layers are
    split along the tokens too (Megatron's sequence parallelism). A tensor size of 1 leaves the model as it is.
    """
    if tp_size == 1:
        return model
    heads = model.config.num_attention_heads
    if heads % tp_size:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tensor parallel size {tp_size}")
    ctx = ShardContext(tp_group, tp_rank, parallel_output, sequence_parallel)
    swapped = 0
    for name, module in list(model.named_modules()):
        style = module_style(name, embed_split_hidden)
        if style is None:
            continue
        local = {leaf: shard_tensor(f"{name}.{leaf}", param.detach(), tp_rank, tp_size, embed_split_hidden)
                 for leaf, param in module.named_parameters(recurse=False)}
        parallel_module = style.build(local, ctx)
        for leaf, param in parallel_module.named_parameters(recurse=False):
            param.requires_grad_(module.get_parameter(leaf).requires_grad)
            if style.param_dims[leaf] is not None:
                _mark_tensor_parallel(param, style.param_dims[leaf])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, parallel_module)
        swapped += 1
    if not swapped:
        raise ValueError(f"no module of {type(model).__name__} matches the tensor-parallel plan: it expects the HF "
                         f"InternLM names (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head)")
    return apply_sequence_parallel(model, tp_group) if sequence_parallel else model


def gather_tensor_parallel_state_dict(model: nn.Module, tp_group, embed_split_hidden: bool) -> dict:
    """The full HF state dict of a model that `apply_tensor_parallel` split, on every rank of `tp_group`."""
    tp_size = dist.get_world_size(tp_group)
    full = {}
    for name, tensor in model.state_dict().items():
        dim = split_dim(name, embed_split_hidden)
        if dim is None or tp_size == 1:
            full[name] = tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group)
        full[name] = torch.cat(parts, dim=dim)
    return full
