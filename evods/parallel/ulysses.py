"""Ulysses sequence parallelism (InternEvo's isp, `tensor=dict(size=N, mode="isp")`; the DeepSpeed-Ulysses scheme)
added to the HF InternLM model by module hooks; the model file knows nothing of process groups.

The N ranks of an isp group share each packed row and hold every weight whole:
- the embedding runs on the whole row on every rank; the first decoder layer keeps this rank's contiguous 1/N of the
  tokens (`keep_own_tokens`: backward, the slice's gradient and zeros elsewhere, so that the N copies of the
  embedding get their own tokens' shares, which DeepSpeed's data-parallel reduction then adds up);
- position_ids are never split: the model derives the packed documents (cu_seqlens) and the RoPE tables from the
  whole rows before the first layer, so a document that crosses a slice boundary attends exactly as unsplit;
- q_proj, k_proj and v_proj run on the token slice; a forward hook turns each output, [B, T/N, heads * D], into
  [B, T, heads/N * D] with one all-to-all (`tokens_to_heads`), so attention sees every token of its share of the
  heads; with fewer KV heads than ranks each rank gets a copy of the KV head its query heads use (an index_select
  before the all-to-all, whose backward sums the copies' gradients);
- o_proj's forward pre-hook turns the attention output back, [B, T, heads/N * D] -> [B, T/N, heads * D];
- the MLPs, norms and the loss (evods.training.loss.PackedLoss with the isp group) work on the token slices.
The attention core reads its head counts off the projections' outputs, so it runs unchanged on heads/N heads.

DeepSpeed's `deepspeed.sequence.layer.DistributedAttention` is not used: it wraps a local attention callable that
receives q, k and v, while the HF attention module projects, applies RoPE and groups the KV heads inside one forward,
so wrapping it would need the model file to call a process-group-aware function; and its all-to-all asserts at least
as many KV heads as ranks (deepspeed/sequence/layer.py, `_resolve_kv_heads`), which rules out InternLM2-style GQA with
fewer KV heads than ranks (8 KV heads at isp 16; InternLM3's 2 KV heads at isp 4). Exchanging the projections'
outputs keeps the model file as it is and lets the KV replication be part of the exchange.
"""
import re
from functools import partial

import torch
from torch import nn

from evods.model import HeadSplit

from .comm import heads_to_tokens, keep_own_tokens, tokens_to_heads
from .sequence_parallel import split_input

ATTENTION = r"model\.layers\.\d+\.self_attn"
FIRST_LAYER = r"model\.layers\.0"


def head_feature_order(num_heads: int, parts: int, head_dim: int, heads_of_part) -> torch.Tensor:
    """The output features of a projection of `num_heads` heads, reordered (and repeated where parts share a head) so
    that chunk p of `parts` equal chunks holds the heads `heads_of_part(p)`."""
    features = torch.arange(num_heads * head_dim).view(num_heads, head_dim)
    return torch.cat([features[list(heads_of_part(part))].flatten() for part in range(parts)])


def _exchange_to_heads(group, order: torch.Tensor | None, module, args, output):
    if order is not None:
        output = output.index_select(-1, order.to(output.device))
    return tokens_to_heads(output, group)


def _exchange_to_tokens(group, module, args):
    return (heads_to_tokens(args[0], group), *args[1:])


def apply_ulysses(model: nn.Module, isp_group) -> nn.Module:
    """Hook Ulysses sequence parallelism over `isp_group` (N ranks) into the HF InternLM `model` (whole weights,
    separate q/k/v projections). A ValueError names the numbers when the heads do not split over N ranks."""
    size = torch.distributed.get_world_size(isp_group)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    problem = HeadSplit.problem(heads, kv_heads, size)
    if problem:
        raise ValueError(f"isp size {size} with num_attention_heads={heads}, num_key_value_heads={kv_heads}: "
                         f"{problem}")
    split = HeadSplit(heads, kv_heads, size)
    head_dim = config.head_dim
    # q: chunk p is query heads [p * H/N, (p + 1) * H/N), the features' own order; k, v: the KV heads those use
    kv_order = None if split.kv_replicas == 1 else head_feature_order(kv_heads, size, head_dim, split.kv_heads)
    local_groups = heads // size // split.kv_heads_per_part
    hooked = 0
    for name, module in model.named_modules():
        if re.fullmatch(FIRST_LAYER, name):
            module.register_forward_pre_hook(partial(split_input, keep_own_tokens, "isp ranks", isp_group))
        if re.fullmatch(ATTENTION, name):
            module.q_proj.register_forward_hook(partial(_exchange_to_heads, isp_group, None))
            for projection in (module.k_proj, module.v_proj):
                projection.register_forward_hook(partial(_exchange_to_heads, isp_group, kv_order))
            module.o_proj.register_forward_pre_hook(partial(_exchange_to_tokens, isp_group))
            module.num_key_value_groups = local_groups  # what transformers' attention functions read
            hooked += 1
    if not hooked:
        raise ValueError(f"no module of {type(model).__name__} matches {ATTENTION}: isp expects the HF InternLM names "
                         f"(model.layers.N.self_attn.q_proj, k_proj, v_proj, o_proj)")
    return model
