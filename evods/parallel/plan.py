"""Tensor parallelism applied to the Hugging Face InternLM model, from one table of how each weight is split.

`TENSOR_PARALLEL_PLAN` maps HF module names to a shard style; a style says which dim of each of its parameters is
split (None: replicated). `TensorParallelSplit` applies the same table to slice full weights (`apply_tensor_parallel`,
`shard`) and to gather them back (`gather_tensor_parallel_state_dict`, `merge`), so the two cannot disagree. Shards
are contiguous chunks along the split dim, rank t holding chunk t, as InternEvo stores them (its
save_model_checkpoint writes one file per tp rank):
- q/k/v rows are head-major, so chunk t of q is query heads [t*H/tp, (t+1)*H/tp). InternEvo's fused `Wqkv` shard t is
  the concatenation [q shard t; k shard t; v shard t] along dim 0, its bias likewise.
- k and v hold the KV heads those query heads use (`evods.model.HeadSplit`): chunk t of KV/tp heads when tp divides
  the KV heads; with fewer KV heads than ranks, tp/KV consecutive ranks hold a copy of one KV head (as vLLM does).
  Each copy's gradient is then only its own query heads' share: a tensor hook sums it over the copies before anything
  else sees it, so the copies stay equal, and only the first copy of each KV head counts in the gradient norm.
- o_proj and down_proj split their input features; their bias (o_proj) is replicated and added after the all-reduce
  (InternEvo stores it on tensor rank 0 only).
- The embedding splits hidden (`embed_split_hidden=True`, InternEvo's `embedding.weight`) or the vocabulary
  (`False`, `embedding.word_embeddings.weight`); lm_head always splits the vocabulary. A head tied to the embedding
  (`tie_word_embeddings`) needs the vocabulary split, and the two share one parameter.
- Everything else (the RMSNorm weights) is replicated.
- A LoRA adapter's factors (evods.model.lora) split so that its term needs no communication of its own: on a
  column-parallel base B splits like the base's output and A is whole; on a row-parallel base A splits like the
  base's input and B is whole (as the LoRA layers of Megatron-based trainers, e.g. NeMo's, place them). The whole
  factor's gradient is each rank's share of the sum, which a tensor hook sums over the group.
With `sequence_parallel` the same weights are split the same way; `evods.parallel.sequence_parallel` adds the
token slicing around them.
"""
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from evods.model import HeadSplit
from evods.model.lora import LORA_FACTORS, is_lora_parameter

from .comm import all_reduce_gradient, sum_gradient_over_copies
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
    holds_kv_heads: bool = False  # the split dim holds KV heads, which several ranks may share (TensorParallelSplit)


COLUMN_DIMS = {"weight": 0, "bias": 0, "lora_A.weight": None, "lora_B.weight": 0}
ROW_DIMS = {"weight": 1, "bias": None, "lora_A.weight": 1, "lora_B.weight": None}
COLUMN = ShardStyle(COLUMN_DIMS, lambda p, ctx: ColumnParallelLinear(
    p["weight"], p.get("bias"), ctx.group, sequence_parallel=ctx.sequence_parallel))
KV_COLUMN = ShardStyle(COLUMN.param_dims, COLUMN.build, holds_kv_heads=True)
ROW = ShardStyle(ROW_DIMS, lambda p, ctx: RowParallelLinear(
    p["weight"], p.get("bias"), ctx.group, sequence_parallel=ctx.sequence_parallel))
VOCAB_HEAD = ShardStyle({"weight": 0}, lambda p, ctx: ColumnParallelLinear(
    p["weight"], None, ctx.group, gather_output=not ctx.parallel_output, sequence_parallel=ctx.sequence_parallel))
EMBEDDING_SPLIT_HIDDEN = ShardStyle({"weight": 1}, lambda p, ctx: HiddenParallelEmbedding(p["weight"], ctx.group))
EMBEDDING_SPLIT_VOCAB = ShardStyle({"weight": 0}, lambda p, ctx: VocabParallelEmbedding(
    p["weight"], ctx.group, vocab_start=ctx.rank * p["weight"].shape[0]))

EMBEDDING = r"model\.embed_tokens"
ATTENTION = r"model\.layers\.\d+\.self_attn"
TENSOR_PARALLEL_PLAN = {  # HF module name (full match) -> style; the embedding's style depends on embed_split_hidden
    rf"{ATTENTION}\.q_proj": COLUMN,
    rf"{ATTENTION}\.[kv]_proj": KV_COLUMN,
    rf"{ATTENTION}\.o_proj": ROW,
    r"model\.layers\.\d+\.mlp\.(gate|up)_proj": COLUMN,
    r"model\.layers\.\d+\.mlp\.down_proj": ROW,
    r"lm_head": VOCAB_HEAD,
}


@dataclass(frozen=True)
class TensorParallelSplit:
    """How tensor parallelism cuts one model's weights over `tp_size` ranks: the plan's table with the model's facts
    (how the embedding is split, how many ranks share each KV head)."""

    tp_size: int
    embed_split_hidden: bool
    kv_replicas: int = 1  # consecutive ranks that hold the same KV heads (tp / KV when there are fewer KV heads)

    @classmethod
    def of(cls, config, tp_size: int, embed_split_hidden: bool) -> "TensorParallelSplit":
        """For a model of HF `config` (num_attention_heads, num_key_value_heads); a ValueError names the numbers when
        the heads do not split over `tp_size` ranks."""
        heads = HeadSplit(config.num_attention_heads, config.num_key_value_heads, tp_size)
        return cls(tp_size, embed_split_hidden, heads.kv_replicas)

    def style(self, module_name: str) -> ShardStyle | None:
        if re.fullmatch(EMBEDDING, module_name):
            return EMBEDDING_SPLIT_HIDDEN if self.embed_split_hidden else EMBEDDING_SPLIT_VOCAB
        for pattern, style in TENSOR_PARALLEL_PLAN.items():
            if re.fullmatch(pattern, module_name):
                return style
        return None

    def _style_of_parameter(self, param_name: str) -> tuple[ShardStyle | None, str]:
        """The style of the plan's module that holds `param_name`, and the parameter's name inside it (`weight`, or
        `lora_A.weight` for its adapter's factor)."""
        module_name, _, leaf = param_name.rpartition(".")
        if is_lora_parameter(param_name):
            module_name, _, factor = module_name.rpartition(".")
            leaf = f"{factor}.{leaf}"
        return self.style(module_name), leaf

    def split_dim(self, param_name: str) -> int | None:
        """The dim along which HF parameter `param_name` is split over the ranks; None when every rank holds it all."""
        style, leaf = self._style_of_parameter(param_name)
        return None if style is None else style.param_dims.get(leaf)

    def replicas(self, param_name: str) -> int:
        """How many consecutive ranks hold the same part of `param_name` (1 unless it holds shared KV heads)."""
        style, _ = self._style_of_parameter(param_name)
        return self.kv_replicas if style is not None and style.holds_kv_heads else 1

    def part(self, param_name: str, full_shape: Sequence[int], rank: int) -> tuple[int, int, int] | None:
        """(dim, start, stop): the entries along its split dim of the full HF parameter `param_name` (of shape
        `full_shape`) that rank `rank` holds; None when every rank holds it all."""
        dim = self.split_dim(param_name)
        if dim is None or self.tp_size == 1:
            return None
        replicas = self.replicas(param_name)
        parts = self.tp_size // replicas
        if full_shape[dim] % parts:
            raise ValueError(f"{param_name} has {full_shape[dim]} entries along dim {dim}, which tensor parallel size "
                             f"{self.tp_size} does not divide; pick a tensor size that divides it")
        size = full_shape[dim] // parts
        index = rank // replicas
        return dim, index * size, (index + 1) * size

    def shard(self, param_name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s part of the full HF parameter `param_name` (a copy; the full tensor when replicated)."""
        part = self.part(param_name, full.shape, rank)
        if part is None:
            return full.clone()
        dim, start, stop = part
        return full.narrow(dim, start, stop - start).clone()

    def merge(self, param_name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full HF parameter from every rank's part (in rank order); a replicated one is rank 0's."""
        dim = self.split_dim(param_name)
        if dim is None or self.tp_size == 1:
            return shards[0]
        return torch.cat(list(shards[::self.replicas(param_name)]), dim=dim)


def _mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    """The attributes Megatron gives a sharded parameter; DeepSpeed's grad norm counts such a parameter on every
    tensor rank, and a replicated one on tensor rank 0 only."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def apply_tensor_parallel(model: nn.Module, tp_group, tp_rank: int, tp_size: int, embed_split_hidden: bool,
                          parallel_output: bool, sequence_parallel: bool = False,
                          materialise: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Swap the modules named in the plan for tensor-parallel ones holding rank `tp_rank`'s slices of their weights.

    The model is changed in place (and returned); it must hold full weights, e.g. fresh or loaded from HF. With
    `parallel_output` the logits stay split along the vocabulary (use `VocabParallelLogits` for the loss);
    otherwise they are gathered. With `sequence_parallel` the activations between the tensor-parallel layers are
    split along the tokens too (Megatron's sequence parallelism). A tensor size of 1 leaves the model as it is.
    A model on the meta device is split on it: `materialise(parameter name, slice)` then gives each slice the tensor
    the parallel module holds (evods.training.model_part: this rank's slices, left empty for a checkpoint to fill).
    """
    if tp_size == 1:
        return model
    try:
        split = TensorParallelSplit.of(model.config, tp_size, embed_split_hidden)
    except ValueError as error:
        raise ValueError(f"num_attention_heads={model.config.num_attention_heads}, num_key_value_heads="
                         f"{model.config.num_key_value_heads} and tensor parallel size {tp_size}: {error}") from None
    ctx = ShardContext(tp_group, tp_rank, parallel_output, sequence_parallel)
    swapped = 0
    for name, module in list(model.named_modules()):
        style = split.style(name)
        if style is None:
            continue
        local = {leaf: split.shard(f"{name}.{leaf}", param.detach(), tp_rank)
                 for leaf, param in module.named_parameters()}
        if materialise is not None:
            local = {leaf: materialise(f"{name}.{leaf}", tensor) for leaf, tensor in local.items()}
        parallel_module = style.build(local, ctx)
        if "lora_A.weight" in local:
            parallel_module.add_adapter(local["lora_A.weight"], local["lora_B.weight"], module.lora_scaling,
                                        getattr(module.lora_dropout, "p", 0.0))
        for leaf, param in parallel_module.named_parameters():
            param.requires_grad_(module.get_parameter(leaf).requires_grad)
            if style.param_dims[leaf] is not None:
                _share_split_parameter(param, style.param_dims[leaf], split.replicas(f"{name}.{leaf}"), tp_group,
                                       tp_rank)
            elif leaf.partition(".")[0] in LORA_FACTORS:  # the whole factor: each rank computed its share
                param.register_hook(partial(all_reduce_gradient, group=tp_group))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, parallel_module)
        swapped += 1
    if not swapped:
        raise ValueError(f"no module of {type(model).__name__} matches the tensor-parallel plan: it expects the HF "
                         f"InternLM names (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head)")
    if model.config.tie_word_embeddings:  # both hold the same vocabulary rows: one parameter again, both gradients
        if embed_split_hidden:
            raise ValueError("a tied output head (tie_word_embeddings) splits the vocabulary rows, as lm_head does: "
                             "set embed_split_hidden=False")
        model.lm_head.weight = model.model.embed_tokens.weight
    local_groups = model.config.num_attention_heads // model.config.num_key_value_heads // split.kv_replicas
    for name, module in model.named_modules():
        if re.fullmatch(ATTENTION, name):
            module.num_key_value_groups = local_groups  # what transformers' attention functions read
    if sequence_parallel:
        # (the whole LoRA factors have their gradient summed already, above)
        apply_sequence_parallel(model, tp_group, lambda param_name: split.split_dim(param_name) is None
                                and not is_lora_parameter(param_name))
    return model


def _share_split_parameter(param: nn.Parameter, dim: int, replicas: int, tp_group, tp_rank: int) -> None:
    """Mark a split parameter for DeepSpeed; a part that `replicas` > 1 ranks hold (shared KV heads) gets its gradient
    summed over them and counts in the gradient norm on the first of them only (tensor rank 0 is always a first one,
    so every KV head counts exactly once)."""
    if replicas > 1 and param.requires_grad:  # (a frozen one, the base under LoRA, has no gradient)
        param.register_hook(partial(sum_gradient_over_copies, group=tp_group, copies=replicas))
    if tp_rank % replicas == 0:
        _mark_tensor_parallel(param, dim)


def gather_tensor_parallel_state_dict(model: nn.Module, tp_group, embed_split_hidden: bool) -> dict:
    """The full HF state dict of a model (with its HF `config`) that `apply_tensor_parallel` split, on every rank of
    `tp_group`."""
    split = TensorParallelSplit.of(model.config, dist.get_world_size(tp_group), embed_split_hidden)
    full = {}
    for name, tensor in model.state_dict().items():
        if split.split_dim(name) is None or split.tp_size == 1:
            full[name] = tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(split.tp_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group)
        full[name] = split.merge(name, parts)
    return full
