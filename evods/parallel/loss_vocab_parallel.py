"""Cross entropy and argmax over logits split along the vocabulary across a tensor-parallel group.

(`VocabParallelLogits` also tells the chunked loss, `evods.training.loss_kernels`, how to combine per-chunk
statistics over the shards; that path never builds even the local [tokens, V/tp] logits whole.)

Each rank holds logits[..., rank*V/tp : (rank+1)*V/tp]; the full [tokens, V] logits are never built. Per token:
  loss = (1 - ε) * (lse - x_label) + ε * (lse - mean_j x_j),   0 where the label is IGNORE_INDEX,
which is F.cross_entropy(..., label_smoothing=ε, reduction="none"). lse, x_label and Σ_j x_j are sums of per-shard
parts, combined with reduce_from_tensor_parallel_region: every rank then holds the same loss, and backward sends each
rank's share of the gradient to its own logits.
"""
import torch
import torch.distributed as dist

from .comm import copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region

IGNORE_INDEX = -100  # evods.data.IGNORE_INDEX (and torch's default); `parallel` does not import `data`


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, group,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token losses (fp32, shaped like labels) from this rank's vocabulary shard of the logits."""
    logits = local_logits.float()
    shard_size = logits.shape[-1]
    vocab_start = dist.get_rank(group) * shard_size
    # Subtracting the global max keeps exp() finite; it is a constant for the gradient, so it needs none.
    global_max = logits.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - global_max
    log_sum_exp = reduce_from_tensor_parallel_region(shifted.exp().sum(-1), group).log()

    local_labels = labels - vocab_start
    in_shard = (local_labels >= 0) & (local_labels < shard_size)
    label_logit = shifted.gather(-1, local_labels.clamp(0, shard_size - 1).unsqueeze(-1)).squeeze(-1)
    label_logit = reduce_from_tensor_parallel_region(label_logit * in_shard, group)
    losses = log_sum_exp - label_logit
    if label_smoothing > 0:
        vocab_size = shard_size * dist.get_world_size(group)
        mean_logit = reduce_from_tensor_parallel_region(shifted.sum(-1), group) / vocab_size
        losses = (1 - label_smoothing) * losses + label_smoothing * (log_sum_exp - mean_logit)
    return losses.masked_fill(labels == IGNORE_INDEX, 0.0)


@torch.no_grad()
def vocab_parallel_argmax(local_logits: torch.Tensor, group) -> torch.Tensor:
    """Global argmax over the vocabulary; ties go to the lowest index, as torch.argmax."""
    size = dist.get_world_size(group)
    local_max, local_index = local_logits.max(dim=-1)
    maxima = [torch.empty_like(local_max) for _ in range(size)]
    indices = [torch.empty_like(local_index) for _ in range(size)]
    dist.all_gather(maxima, local_max.contiguous(), group=group)
    dist.all_gather(indices, (local_index + dist.get_rank(group) * local_logits.shape[-1]).contiguous(), group=group)
    best_rank = torch.stack(maxima).argmax(dim=0, keepdim=True)  # the first maximum is the lowest vocabulary index
    return torch.stack(indices).gather(0, best_rank).squeeze(0)


class VocabParallelLogits:
    """What the loss needs from a head split along the vocabulary over tensor ranks (the weight always is, under
    tensor parallelism): reading its vocab-sharded logits, and placing its weight shard in the vocabulary.

    `evods.training.loss.FullLogits` is the one-rank twin.
    """

    def __init__(self, group, sequence_parallel: bool = False):
        self.group = group
        self.sequence_parallel = sequence_parallel  # the layout's (evods.parallel.ParallelLayout)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states every rank multiplies by its shard; backward sums their gradient over the ranks. Under
        sequence parallelism they arrive all-gathered from the ranks' token slices, and that gather's backward
        already sums (reduce-scatters) them, as ColumnParallelLinear relies on."""
        return hidden if self.sequence_parallel else copy_to_tensor_parallel_region(hidden, self.group)

    def vocab_start(self, local_vocab: int) -> int:
        return dist.get_rank(self.group) * local_vocab

    def vocab_size(self, local_vocab: int) -> int:
        return dist.get_world_size(self.group) * local_vocab

    def gather_shard_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Every rank's per-token statistics over its shard, [tokens, k] -> [tp, tokens, k] in vocabulary order."""
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, stats.contiguous(), group=self.group)
        return torch.stack(parts)

    def token_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.group, label_smoothing)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_argmax(logits, self.group)
