"""The training loss on packed rows (`build_loss` makes it from the config's `loss` section), and the token-level
metrics InternEvo logs beside it (AccPerplex and LossWithTypeId in internlm/model/metrics.py).

The loss applies the output head itself, with one of the kernels in loss_kernels.py; under tensor parallelism the
head holds a shard of the vocabulary, which evods.parallel.loss_vocab_parallel reads.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from evods.config import ConfigError, TrainConfig
from evods.data import IGNORE_INDEX
from evods.parallel import ParallelLayout, VocabParallelLogits
from evods.parallel.comm import own_tokens
from evods.parallel.zero import full_shape

from .loss_kernels import (
    auto_chunk_tokens,
    choose_loss_kernel,
    chunked_linear_cross_entropy,
    liger_linear_cross_entropy,
)

logger = logging.getLogger("evods")


class TokenMetrics:
    """Sums over a step's micro-batches: per-type loss and token counts, accuracy.

    Kept as running tensors on the device of the last pipeline stage; `reduce_and_reset` all-reduces them over the
    data-parallel group once per step, so logging costs one collective.
    """

    def __init__(self, num_types: int):
        self.num_types = num_types
        self.reset()

    def reset(self) -> None:
        # rows: loss sum, token count, correct count; one column per type id
        self.sums = torch.zeros(3, max(self.num_types, 1), dtype=torch.float64)

    @torch.no_grad()
    def add(self, token_losses: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor):
        mask = labels != IGNORE_INDEX
        types = type_ids[mask].clamp(0, self.sums.shape[1] - 1).cpu()
        correct = (predictions[mask] == labels[mask]).double().cpu()
        self.sums[0].index_add_(0, types, token_losses[mask].double().cpu())
        self.sums[1].index_add_(0, types, torch.ones_like(correct))
        self.sums[2].index_add_(0, types, correct)

    def reduce_and_reset(self, group=None) -> dict:
        sums = self.sums
        if torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums, group=group)
        self.reset()
        return {"loss_sum": sums[0], "tokens": sums[1], "correct": sums[2]}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross entropy in fp32, 0 where the label is ignored. Labels are already shifted by the data."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none",
                           label_smoothing=label_smoothing).view(labels.shape)


class FullLogits:
    """A head that holds the whole vocabulary; `evods.parallel.VocabParallelLogits` is the tensor-parallel twin.

    Says how to read its logits (`token_cross_entropy`, `argmax`) and, for the chunked loss, where its weight sits in
    the vocabulary (all of it, on this rank).
    """

    def token_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        return token_cross_entropy(logits, labels, label_smoothing)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def vocab_start(self, local_vocab: int) -> int:
        return 0

    def vocab_size(self, local_vocab: int) -> int:
        return local_vocab

    def gather_shard_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return stats.unsqueeze(0)  # one shard: the whole vocabulary


class PackedLoss:
    """Token-mean cross entropy of one micro-batch, ignoring -100, as InternEvo's FlashGPTLMLoss, from the final
    hidden states: the loss applies the output head itself, so that it need not hold the [tokens, vocab] logits.

    `kernel` (see `loss_kernels.choose_loss_kernel`):
    - "chunked": the head and cross entropy `chunk_tokens` tokens at a time, forward and backward
      (`chunked_linear_cross_entropy`); tokens labelled -100 are left out before the head, so they cost nothing;
    - "liger": the same with Liger-Kernel's fused Triton kernel (CUDA, vocabulary not split);
    - "full": the whole logits at once, as transformers does (a reference, and for comparison).
    Each gives the same loss, gradients and token metrics. `head` is the model's lm_head (nn.Linear, or the
    tensor-parallel ColumnParallelLinear with `vocab=VocabParallelLogits(group)`); its weight is read at every call.

    DeepSpeed divides each micro-batch loss by gradient_accumulation_steps (= micro_num) before backward, which is
    InternEvo's per-micro-batch `/ micro_num`.

    With `isp_group` (Ulysses sequence parallelism, evods.parallel.ulysses) the hidden states are this rank's
    contiguous 1/N of each row's tokens: the labels are cut the same way, the token count is the whole row's (summed
    over the group), and the loss is N times this rank's tokens' share. DeepSpeed averages gradients over its
    data-parallel group, all dp × N ranks, so the N shares add up to the row's loss and its exact gradient (and the
    mean of the ranks' losses is the rows' mean loss).

    Called as `loss(hidden_states, (labels, type_ids))`, the signature a DeepSpeed PipelineModule gives its loss_fn;
    hidden_states are the full sequence's (isp: this rank's slice), [B, T, H].
    """

    def __init__(self, head: nn.Module, label_smoothing: float = 0.0, metrics: TokenMetrics | None = None,
                 vocab: "FullLogits | None" = None, kernel: str = "chunked", chunk_tokens: int | None = None,
                 isp_group=None):
        if kernel not in ("chunked", "liger", "full"):
            raise ValueError(f"PackedLoss kernel {kernel!r}: expected 'chunked', 'liger' or 'full' "
                             f"(choose_loss_kernel resolves 'auto')")
        self.head = head
        self.label_smoothing = label_smoothing
        self.metrics = metrics
        self.vocab = vocab or FullLogits()  # how the head covers the vocabulary: whole, or split over tensor ranks
        self.kernel = kernel
        self.chunk_tokens = chunk_tokens or auto_chunk_tokens(*full_shape(head.weight))
        self.isp_group = isp_group

    def __call__(self, hidden_states: torch.Tensor, targets) -> torch.Tensor:
        if self.isp_group is not None:
            targets = [own_tokens(t, self.isp_group) for t in targets]
        labels, type_ids = (t.reshape(-1) for t in targets)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        # The head runs here, not as a module call: the span keeps it under its module's name in --profiling traces.
        with record_function("lm_head"):
            if self.kernel == "full":
                loss_sum, num_tokens = self._full_logits(hidden, labels, type_ids)
            else:
                loss_sum, num_tokens = self._without_logits(hidden, labels, type_ids)
        share = 1
        if self.isp_group is not None:
            counted = torch.tensor([num_tokens], dtype=torch.int64)
            torch.distributed.all_reduce(counted, group=self.isp_group)
            num_tokens, share = int(counted), torch.distributed.get_world_size(self.isp_group)
        # A micro-batch whose labels are all masked contributes 0, not nan.
        return loss_sum * share / max(num_tokens, 1)

    def _full_logits(self, hidden, labels, type_ids):
        logits = F.linear(self.vocab.head_input(hidden), self.head.weight).float()
        token_losses = self.vocab.token_cross_entropy(logits, labels, self.label_smoothing)
        if self.metrics is not None:
            self.metrics.add(token_losses.detach(), self.vocab.argmax(logits.detach()), labels, type_ids)
        return token_losses.sum(), int((labels != IGNORE_INDEX).sum())

    def _without_logits(self, hidden, labels, type_ids):
        kept = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        hidden, labels, type_ids = hidden.index_select(0, kept), labels[kept], type_ids[kept]
        if self.kernel == "liger":
            mixed_types = self.metrics is not None and len(type_ids) > 0 and bool(type_ids.amin() != type_ids.amax())
            loss_sum, token_losses, predictions = liger_linear_cross_entropy(hidden, self.head.weight, labels,
                                                                             self.label_smoothing, mixed_types)
        else:
            loss_sum, token_losses, predictions = chunked_linear_cross_entropy(
                self.vocab.head_input(hidden), self.head.weight, labels, self.vocab, self.label_smoothing,
                self.chunk_tokens)
        if self.metrics is not None:
            self.metrics.add(token_losses, predictions, labels, type_ids)
        return loss_sum, len(kept)


def build_loss(cfg: TrainConfig, layout: ParallelLayout, head: torch.nn.Module, device_type: str,
               metrics: TokenMetrics | None, tensor_group=None, isp_group=None) -> PackedLoss:
    """The training loss from the config's `loss` section; it applies `head` (the model's lm_head) itself. Under isp
    (layout.sp > 1) it takes this rank's tokens of `isp_group`'s rows."""
    # Under tensor parallelism lm_head's weight is a vocabulary shard whatever parallel_output says (which only
    # decides whether the model's own logits are gathered); the loss applies that shard.
    vocab_split = layout.tp > 1
    vocab = VocabParallelLogits(tensor_group, layout.sequence_parallel) if vocab_split else FullLogits()
    try:
        kernel = choose_loss_kernel(cfg.loss.kernel, device_type, vocab_split)
    except ValueError as error:
        raise (cfg.source.error("loss.kernel", str(error)) if cfg.source else ConfigError(str(error))) from None
    loss_fn = PackedLoss(head, cfg.loss.label_smoothing, metrics, vocab, kernel, cfg.loss.chunk_tokens,
                         isp_group if layout.sp > 1 else None)
    local_vocab, hidden_size = full_shape(head.weight)
    logger.info("loss: %s kernel%s, head %d x %d%s", kernel,
                f", {loss_fn.chunk_tokens} tokens per chunk" if kernel == "chunked" else "", local_vocab, hidden_size,
                " (this rank's vocabulary shard)" if vocab_split else "")
    return loss_fn
