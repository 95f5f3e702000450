"""Megatron-style communication inside a tensor-parallel group, as autograd functions.

Each pairs a forward collective with the backward that keeps gradients exact when the activations on either side are
replicated over the group:
- copy_to_tensor_parallel_region: identity forward, all-reduce backward (a replicated input feeds sharded weights);
- reduce_from_tensor_parallel_region: all-reduce forward, identity backward (partial sums become the full value);
- gather_from_tensor_parallel_region: all-gather along the last dim forward, keep the own slice backward.
"""
import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
    return tensor


def _all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return tensor.chunk(size, dim=-1)[rank].contiguous()


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
        return _all_gather_last_dim(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last_dim(grad, ctx.group), None


def copy_to_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(tensor, group)


def reduce_from_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(tensor, group)


def gather_from_tensor_parallel_region(tensor: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromRegion.apply(tensor, group)
