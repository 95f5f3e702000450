"""The training loss on packed rows, and the token-level metrics InternEvo logs beside it
(AccPerplex and LossWithTypeId in internlm/model/metrics.py)."""
import torch
import torch.nn.functional as F

from evods.data import IGNORE_INDEX

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
    """Logits that hold the whole vocabulary; `evods.parallel.VocabParallelLogits` is the tensor-parallel twin."""

    def token_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        return token_cross_entropy(logits, labels, label_smoothing)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class PackedLoss:
    """Token-mean cross entropy of one micro-batch, ignoring -100, as InternEvo's FlashGPTLMLoss.

    DeepSpeed divides each micro-batch loss by gradient_accumulation_steps (= micro_num) before backward, which is
    InternEvo's per-micro-batch `/ micro_num`. Called as `loss(logits, (labels, type_ids))`, the signature a
    DeepSpeed PipelineModule gives its loss_fn.
    """

    def __init__(self, label_smoothing: float = 0.0, metrics: TokenMetrics | None = None, logits=FullLogits()):
        self.label_smoothing = label_smoothing
        self.metrics = metrics
        self.logits = logits  # how to read the logits: whole, or split along the vocabulary over tensor ranks

    def __call__(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels, type_ids = targets
        token_losses = self.logits.token_cross_entropy(logits, labels, self.label_smoothing)
        num_tokens = (labels != IGNORE_INDEX).sum()
        if self.metrics is not None:
            self.metrics.add(token_losses.detach(), self.logits.argmax(logits.detach()), labels, type_ids)
        # A micro-batch whose labels are all masked contributes 0, not nan.
        return token_losses.sum() / num_tokens.clamp(min=1)
