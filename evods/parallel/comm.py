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
"""
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
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return tensor.chunk(size, dim=dim)[rank].contiguous()


def _reduce_scatter(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    # The list form: gloo has no reduce_scatter_tensor along a dim other than 0.
    parts = [part.contiguous() for part in tensor.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        return _all_reduce(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _all_gather(tensor, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.group, dim=-1), None


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _own_slice(tensor, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, SEQUENCE_DIM), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _all_gather(tensor, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, SEQUENCE_DIM), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _reduce_scatter(tensor, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, SEQUENCE_DIM), None


def copy_to_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(tensor, group)


def reduce_from_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(tensor, group)


def gather_from_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromRegion.apply(tensor, group)


def scatter_to_sequence_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToSequenceRegion.apply(tensor, group)


def gather_from_sequence_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromSequenceRegion.apply(tensor, group)


def reduce_scatter_to_sequence_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterToSequenceRegion.apply(tensor, group)


def all_reduce_gradient(grad: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group of a replicated parameter's gradient (a tensor hook: returns a new tensor)."""
    return _all_reduce(grad.clone(), group)
