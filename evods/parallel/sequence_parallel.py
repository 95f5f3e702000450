"""Megatron-style sequence parallelism over the tensor-parallel group, added to a tensor-parallel HF InternLM model
by module hooks (the model file itself knows nothing of process groups).

With tensor parallelism alone every tensor rank holds the whole [batch, tokens, hidden] activations of the RMSNorms
and residual adds. Here each rank holds 1/tp of the tokens (dim 1) there, for the same communication volume:
- the first decoder layer's input is split along the tokens (its backward all-gathers);
- each attention and MLP block all-gathers its input (backward: reduce-scatter), so the column-parallel q/k/v and
  gate/up see whole rows, and attention sees every document whole;
- o_proj and down_proj reduce-scatter their partial sums instead of all-reducing them (`RowParallelLinear`);
- the final norm's output is all-gathered, so the head and the loss see every token, as without.
position_ids are never split: the model derives the document layout and the RoPE tables from the full rows before
the first layer, and attention runs on the gathered rows. Under a pipeline the token slice is what travels between
stages, beside the full fixed-shape position_ids.

The replicated parameters used on the slices (the RMSNorm weights, o_proj's bias: those the tensor-parallel plan
does not split) get only their own tokens' share of the gradient on each rank. A tensor hook sums it over the group
as it is computed, before DeepSpeed's ZeRO hooks accumulate and reduce it (the job of Megatron's
`allreduce_sequence_parallel_grads`).
"""
import re
from collections.abc import Callable
from functools import partial

import torch.distributed as dist
from torch import nn

from .comm import all_reduce_gradient, gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region


def split_input(keep: Callable, ranks: str, group, module, args):
    """A forward pre-hook (bound with partial): the module's first input, [B, T, H], cut to this rank's contiguous
    slice of the tokens by `keep(tensor, group)`, whose backward says what the rest of the row gets (Megatron's
    all-gather, Ulysses' zeros); `ranks` names the group's ranks in the error."""
    tokens, size = args[0].shape[1], dist.get_world_size(group)
    if tokens % size:
        raise ValueError(f"sequence parallelism splits the {tokens} tokens of each row over {size} {ranks}, which "
                         f"does not divide them; use rows whose length is a multiple of {size}")
    return (keep(args[0], group), *args[1:])


def _gather_input(group, module, args):
    return (gather_from_sequence_parallel_region(args[0], group), *args[1:])


def _gather_output(group, module, args, output):
    return gather_from_sequence_parallel_region(output, group)


# HF module name (full match) -> (hook kind, hook): where the token slices begin, are gathered and end.
SEQUENCE_PARALLEL_PLAN = {
    r"model\.layers\.0": ("pre", partial(split_input, scatter_to_sequence_parallel_region, "tensor ranks")),
    r"model\.layers\.\d+\.(self_attn|mlp)": ("pre", _gather_input),
    r"model\.norm": ("post", _gather_output),
}
# Parameters computed on the token slices: those of the decoder layers and the final norm.
SLICED_REGION = r"model\.(layers\.\d+|norm)\..+"


def apply_sequence_parallel(model: nn.Module, tp_group, replicated: Callable[[str], bool]) -> nn.Module:
    """Hook sequence parallelism into `model`, which `apply_tensor_parallel` has split with `sequence_parallel=True`
    (its row-parallel layers reduce-scatter, its column-parallel layers take gathered inputs). `replicated(name)`:
    whether every tensor rank holds the whole parameter `name` (the plan's answer)."""
    hooked = set()
    for name, module in model.named_modules():
        for pattern, (kind, hook) in SEQUENCE_PARALLEL_PLAN.items():
            if re.fullmatch(pattern, name):
                register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                register(partial(hook, tp_group))
                hooked.add(pattern)
    if hooked != set(SEQUENCE_PARALLEL_PLAN):
        missing = sorted(set(SEQUENCE_PARALLEL_PLAN) - hooked)
        raise ValueError(f"no module of {type(model).__name__} matches {missing} of the sequence-parallel plan: it "
                         f"expects the HF InternLM names (model.layers.N.self_attn, model.layers.N.mlp, model.norm)")
    for name, param in model.named_parameters():
        if re.fullmatch(SLICED_REGION, name) and replicated(name):
            param.sequence_parallel = True  # Megatron's mark of a replicated parameter with per-slice gradients
            if param.requires_grad:  # (a frozen one, the base under LoRA, has none)
                param.register_hook(partial(all_reduce_gradient, group=tp_group))
    return model

