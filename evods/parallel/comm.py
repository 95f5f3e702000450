"""Megatron-style communication inside a tensor-parallel group, as autograd functions.

Each pairs a forward collective with the backward that keeps gradients exact. Tensor parallelism, where the
activations on either side are replicated over the group:
- copy_to_tensor_parallel_region: identity forward, all-reduce backward (a replicated input feeds sharded weights);
- reduce_from_tensor_parallel_region: all-reduce forward, identity backward (partial sums become the full value);
- gather_from_tensor_parallel_region: all-gather along the last dim forward, keep the own slice backward.
Sequence parallelism, where each rank holds 1/tp of the tokens (dim 1 of [batch, tokens, hidden]) outside the
tensor-parallel layers:
- scatter_to_sequence_parallel_region: keep the own slice of the tokens forward, all-gather backward;
- gather_from_sequence_parallel_region: all-gather the tokens forward, reduce-scatter backward (the ranks' partial
  input gradients of the column-parallel layers are summed, each keeping its tokens' share);
- reduce_scatter_to_sequence_parallel_region: reduce-scatter over the tokens forward, all-gather backward (a
  row-parallel layer's partial sums, each rank keeping its tokens).
Ulysses sequence parallelism (InternEvo's isp, evods.parallel.ulysses), where each rank holds 1/N of the tokens and
every weight whole:
- keep_own_tokens: keep the own slice of the tokens forward, the slice's gradient in zeros backward (the input is
  computed whole on every rank, each rank's copy gets its own tokens' share of the gradient);
- tokens_to_heads: [B, T/N, N * F] -> [B, T, F] by one all-to-all, chunk n of the last dim going to rank n (before
  attention: all tokens, this rank's heads); heads_to_tokens is its inverse (after attention). Each one's backward is
  the other.
"""
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1  # [batch, tokens, hidden]


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


def _own_slice(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk along `dim`, a view."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return tensor.chunk(size, dim=dim)[rank]


def _reduce_scatter(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    # The list form: gloo has no reduce_scatter_tensor along a dim other than 0.
    parts = [part.contiguous() for part in tensor.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _summed(tensor: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(tensor.clone(), group)


def _unchanged(tensor: torch.Tensor, group) -> torch.Tensor:
    return tensor


def _own_last_dim_slice(tensor: torch.Tensor, group) -> torch.Tensor:
    return _own_slice(tensor, group, dim=-1).contiguous()


def own_tokens(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous chunk of the tokens (dim 1), a copy."""
    # A copy even where the view is contiguous (a one-row batch): the view would keep the whole row alive.
    return _own_slice(tensor, group, SEQUENCE_DIM).clone(memory_format=torch.contiguous_format)


def _own_tokens_in_zeros(tensor: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    whole = tensor.new_zeros(*tensor.shape[:SEQUENCE_DIM], tensor.shape[SEQUENCE_DIM] * size,
                             *tensor.shape[SEQUENCE_DIM + 1:])
    whole.chunk(size, dim=SEQUENCE_DIM)[rank].copy_(tensor)
    return whole


def _all_to_all_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Chunk n of dim 0 goes to rank n; chunk n of the result came from rank n."""
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor, group=group)
    return out


def _tokens_to_heads(tensor: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    batch, tokens = tensor.shape[:2]
    chunks = tensor.unflatten(-1, (size, -1)).permute(2, 0, 1, 3)  # [N, B, T/N, F]: chunk n for rank n
    received = _all_to_all_first_dim(chunks, group)  # [N, B, T/N, F]: rank n's tokens, this rank's features
    return received.permute(1, 0, 2, 3).reshape(batch, size * tokens, -1)


def _heads_to_tokens(tensor: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    batch, tokens = tensor.shape[:2]
    chunks = tensor.unflatten(1, (size, tokens // size)).transpose(0, 1)  # [N, B, T/N, F]: rank n's tokens
    received = _all_to_all_first_dim(chunks, group)  # [N, B, T/N, F]: this rank's tokens, rank n's features
    return received.permute(1, 2, 0, 3).reshape(batch, tokens // size, -1)


def _region(name: str, forward: Callable, backward: Callable) -> Callable:
    """`forward(tensor, group)` as an autograd function whose backward is `backward(grad, group)`; call it as
    f(tensor, group)."""

    def forward_(ctx, tensor, group):
        ctx.group = group
        return forward(tensor, group)

    def backward_(ctx, grad):
        return backward(grad, ctx.group), None

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward_), "backward": staticmethod(backward_)})
    return function.apply


copy_to_tensor_parallel_region = _region("CopyToTensorParallelRegion", _unchanged, _summed)
reduce_from_tensor_parallel_region = _region("ReduceFromTensorParallelRegion", _summed, _unchanged)
gather_from_tensor_parallel_region = _region("GatherFromTensorParallelRegion", partial(_all_gather, dim=-1),
                                             _own_last_dim_slice)
scatter_to_sequence_parallel_region = _region("ScatterToSequenceParallelRegion", own_tokens,
                                              partial(_all_gather, dim=SEQUENCE_DIM))
gather_from_sequence_parallel_region = _region("GatherFromSequenceParallelRegion",
                                               partial(_all_gather, dim=SEQUENCE_DIM),
                                               partial(_reduce_scatter, dim=SEQUENCE_DIM))
reduce_scatter_to_sequence_parallel_region = _region("ReduceScatterToSequenceParallelRegion",
                                                     partial(_reduce_scatter, dim=SEQUENCE_DIM),
                                                     partial(_all_gather, dim=SEQUENCE_DIM))
keep_own_tokens = _region("KeepOwnTokens", own_tokens, _own_tokens_in_zeros)
tokens_to_heads = _region("TokensToHeads", _tokens_to_heads, _heads_to_tokens)
heads_to_tokens = _region("HeadsToTokens", _heads_to_tokens, _tokens_to_heads)


def all_reduce_gradient(grad: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group of a replicated parameter's gradient (a tensor hook: returns a new tensor)."""
    return _summed(grad, group)


def sum_gradient_over_copies(grad: torch.Tensor, group, copies: int) -> torch.Tensor:
    """The sum of a parameter's gradient over the `copies` consecutive ranks of `group` that hold the same tensor (a
    tensor hook: returns a new tensor). Each set of copies has a slot in one buffer; every rank writes its gradient
    into its set's slot, one all-reduce over the group sums every slot over its set, and each rank reads its slot back
    (no process group per set of copies is needed)."""
    slot = dist.get_rank(group) // copies
    slots = grad.new_zeros(dist.get_world_size(group) // copies, *grad.shape)
    slots[slot] = grad
    return _all_reduce(slots, group)[slot]
