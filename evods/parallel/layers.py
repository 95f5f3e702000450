"""Tensor-parallel replacements for nn.Linear and nn.Embedding.

They hold only this rank's shard, under the same parameter names as the modules they replace (`weight`, `bias`), so
state-dict keys stay the Hugging Face ones. `evods.parallel.plan` builds them from full modules.
"""
import torch
import torch.nn.functional as F
from torch import nn

from evods.model.lora import LoraAdaptable

from .comm import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def _parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor)


class ColumnParallelLinear(LoraAdaptable, nn.Module):
    """y = x Wᵀ + b with W and b split along the output features: each rank computes its slice of y.

    With `gather_output` the slices are all-gathered, so every rank sees the full y. With `sequence_parallel` x
    arrives all-gathered from the ranks' token slices (`evods.parallel.sequence_parallel`), and that gather's
    backward already sums the ranks' input gradients, so the all-reduce is left out here.

    A LoRA adapter (`add_adapter`) holds A whole and this rank's rows of B: it adds this rank's slice of the low-rank
    term to this rank's slice of y. A's gradient is then this rank's share only (`evods.parallel.plan` sums it).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, gather_output: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight = _parameter(weight)
        self.bias = _parameter(bias)
        self.group = group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            x = copy_to_tensor_parallel_region(x, self.group)
        out = self.with_adapter(x, F.linear(x, self.weight, self.bias))
        return gather_from_tensor_parallel_region(out, self.group) if self.gather_output else out

    def extra_repr(self) -> str:
        return (f"local_shape={tuple(self.weight.shape)}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(LoraAdaptable, nn.Module):
    """y = x Wᵀ + b with W split along the input features: x arrives split the same way (a column-parallel output).

    The partial products are all-reduced; the bias is replicated and added once, after the sum. With
    `sequence_parallel` they are reduce-scattered instead: each rank keeps the sum for its own slice of the tokens.

    A LoRA adapter (`add_adapter`) holds this rank's columns of A and B whole: its term on this rank's slice of x is
    a partial sum too, added before the reduction, which sums it with the others (no communication of its own). B's
    gradient is then this rank's share only (`evods.parallel.plan` sums it).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = _parameter(weight)
        self.bias = _parameter(bias)
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = reduce_scatter_to_sequence_parallel_region if self.sequence_parallel \
            else reduce_from_tensor_parallel_region
        out = reduce(self.with_adapter(x, F.linear(x, self.weight)), self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"local_shape={tuple(self.weight.shape)}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class HiddenParallelEmbedding(nn.Module):
    """InternEvo's `embed_split_hidden=True` (Embedding1D): each rank holds [vocab, hidden/tp]; outputs are gathered."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = _parameter(weight)
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel_region(F.embedding(input_ids, self.weight), self.group)

    def extra_repr(self) -> str:
        return f"local_shape={tuple(self.weight.shape)}"


class VocabParallelEmbedding(nn.Module):
    """InternEvo's `embed_split_hidden=False`: each rank holds the rows [vocab_start, vocab_start + vocab/tp).

    Tokens outside the shard look up zeros; the all-reduce adds the one rank that holds each token.
    """

    def __init__(self, weight: torch.Tensor, group, vocab_start: int):
        super().__init__()
        self.weight = _parameter(weight)
        self.group = group
        self.vocab_start = vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return f"local_shape={tuple(self.weight.shape)}, vocab_start={self.vocab_start}"
