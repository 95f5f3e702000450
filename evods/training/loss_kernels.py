"""The output head and its cross entropy in token chunks, so the [tokens, vocab] logits are never held whole.

For InternLM's 103,168-token vocabulary the logits of one 8k-token micro-batch are 3.4 GB in fp32, and again as much
for their gradient and for the softmax inside cross entropy. `chunked_linear_cross_entropy` instead takes the final
hidden states and the head weight, and for `chunk_tokens` tokens at a time computes the logits, each token's loss and
argmax, and (when gradients are wanted) the gradients with respect to the hidden states and the head weight: in the
forward, as Liger-Kernel's fused linear cross entropy does, so the head still costs three matmuls (logits,
grad_hidden, grad_weight) and backward only scales the stored gradients by the incoming one. Memory beyond the
weights is one chunk of logits plus fp32 accumulators the size of the hidden states and of the head weight.

Per token, with x the logits, y the label, ε the label smoothing and V the vocabulary size:
    loss = (1 - ε) (lse - x_y) + ε (lse - mean_j x_j),    d loss / d x_j = softmax_j - (1 - ε) [j = y] - ε / V
which is F.cross_entropy(..., label_smoothing=ε). Under tensor parallelism each rank holds a vocabulary shard of the
weight (its rows [start, start + V/tp)); per chunk, every rank's (max, Σ exp(x - max), x_y, Σ x, argmax) over its
shard are gathered and combined (`combine_shard_stats`), so every rank computes the same losses and its own shard of
the gradients.

On CUDA, Liger-Kernel's Triton kernel does the same job (`liger_linear_cross_entropy`); `choose_loss_kernel` picks it
where it is installed and the vocabulary is not split.
"""
import functools
import importlib.metadata

import torch

LOSS_KERNELS = ("auto", "chunked", "liger", "full")
# 0.8.2 fixed the head-weight gradient of reduction="none" (Liger-Kernel PR #1298), which per-type losses need.
LIGER_MIN_VERSION = (0, 8, 2)
# Tokens per chunk: the chunk's fp32 logits hold about as many elements as the head weight (tokens = hidden size), so
# the head's memory stays in proportion to its weight whatever the micro-batch, and each chunk's matmuls are large
# enough to run at full speed (the fp32 grad_weight accumulator is read and written once per chunk). The budget keeps a
# chunk's logits under 256 MiB when hidden is large and the vocabulary is not split.
MIN_CHUNK_TOKENS = 256
CHUNK_LOGITS_BUDGET = 2**26  # fp32 elements


def auto_chunk_tokens(vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk for a head weight of [vocab_size, hidden_size] (this rank's shard under tensor parallelism)."""
    return max(MIN_CHUNK_TOKENS, min(hidden_size, CHUNK_LOGITS_BUDGET // vocab_size))


def combine_shard_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (log-sum-exp, label logit, Σ logits, argmax) over the whole vocabulary, from per-shard statistics.

    `stats` is [shards, tokens, 5], the shards in vocabulary order, columns: max logit, Σ exp(x - max), the label's
    logit (0 in shards without the label), Σ x, argmax as a global vocabulary index. Ties in the argmax go to the
    lowest index, as torch.argmax.
    """
    shard_max, sum_exp, label_logit, logit_sum, argmax = stats.unbind(-1)
    top = shard_max.amax(0)
    log_sum_exp = top + (sum_exp * (shard_max - top).exp()).sum(0).log()
    first_top_shard = (shard_max == top).int().argmax(0, keepdim=True)
    return log_sum_exp, label_logit.sum(0), logit_sum.sum(0), argmax.gather(0, first_top_shard).squeeze(0).long()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab, label_smoothing, chunk_tokens, grads_for):
        tokens, local_vocab = hidden.shape[0], weight.shape[0]
        vocab_start, vocab_size = vocab.vocab_start(local_vocab), vocab.vocab_size(local_vocab)
        token_losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(tokens, dtype=torch.long, device=hidden.device)
        want_hidden, want_weight = grads_for
        grad_hidden = hidden.new_empty(hidden.shape, dtype=torch.float32) if want_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if want_weight else None
        # Two chunk-sized buffers, reused by every chunk (a fresh [chunk, V] tensor per chunk costs page faults on CPU).
        buffer_rows = min(chunk_tokens, tokens)
        logits_buffer = weight.new_empty((buffer_rows, local_vocab), dtype=torch.float32)
        probs_buffer = torch.empty_like(logits_buffer)
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            hidden_chunk = hidden[rows]
            logits = logits_buffer[:hidden_chunk.shape[0]]
            if weight.dtype == torch.float32:
                torch.mm(hidden_chunk, weight.t(), out=logits)
            else:  # in the head's dtype, then fp32, as the unchunked head
                logits.copy_(hidden_chunk @ weight.t())
            local_labels = labels[rows] - vocab_start
            in_shard = (local_labels >= 0) & (local_labels < local_vocab)
            local_labels = local_labels.clamp(0, local_vocab - 1).unsqueeze(1)
            label_logit = logits.gather(1, local_labels).squeeze(1).masked_fill(~in_shard, 0.0)
            shard_max, shard_argmax = logits.max(1)
            logit_sum = logits.sum(1) if label_smoothing else torch.zeros_like(shard_max)
            probs = torch.softmax(logits, 1, out=probs_buffer[:hidden_chunk.shape[0]])
            # softmax = exp(x - max) / Σ exp(x - max) is 1 / Σ at the max: the sum without another pass over the chunk
            sum_exp = probs.gather(1, shard_argmax.unsqueeze(1)).squeeze(1).reciprocal()
            stats = torch.stack([shard_max, sum_exp, label_logit, logit_sum, (shard_argmax + vocab_start).float()], 1)
            shard_stats = vocab.gather_shard_stats(stats)
            log_sum_exp, label_logit, logit_sum, argmax = combine_shard_stats(shard_stats)
            losses = log_sum_exp - label_logit
            if label_smoothing:
                losses = (1 - label_smoothing) * losses + label_smoothing * (log_sum_exp - logit_sum / vocab_size)
            token_losses[rows] = losses
            predictions[rows] = argmax
            if not (want_hidden or want_weight):
                continue
            # d(Σ losses)/d logits for this shard's columns: softmax over the whole vocabulary, minus the smoothed
            # one-hot label.
            if len(shard_stats) > 1:  # the shard's softmax, rescaled to the whole vocabulary's
                probs.mul_((shard_max + sum_exp.log() - log_sum_exp).exp().unsqueeze(1))
            probs.scatter_add_(1, local_labels, in_shard.unsqueeze(1).float().mul_(label_smoothing - 1))
            if label_smoothing:
                probs.sub_(label_smoothing / vocab_size)
            grad_logits = probs.to(weight.dtype)
            if want_hidden and grad_hidden.dtype == grad_logits.dtype:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            elif want_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight and grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk)
            elif want_weight:  # low precision: each chunk's product in the head's dtype, summed in fp32
                grad_weight += grad_logits.t() @ hidden_chunk
        # Kept on ctx, not save_for_backward: they are neither inputs nor outputs, and backward scales them in place.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(token_losses, predictions)
        return token_losses.sum(), token_losses, predictions

    @staticmethod
    def backward(ctx, grad_loss_sum, _grad_token_losses, _grad_predictions):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss computed its gradients once, in the forward; it cannot run backward "
                               "twice (retain_graph)")
        grads = [None if grad is None else grad.mul_(grad_loss_sum).to(dtype)
                 for grad, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return grads[0], grads[1], None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab,
                                 label_smoothing: float = 0.0, chunk_tokens: int | None = None):
    """(Σ losses, per-token losses, per-token argmax) of the head `weight` [V, H] applied to `hidden` [N, H].

    `labels` [N] are all real labels (drop -100 tokens first). `vocab` says how the weight covers the vocabulary:
    `evods.training.loss.FullLogits` (the whole of it) or `evods.parallel.VocabParallelLogits` (this rank's shard;
    pass the hidden states through its `head_input` first). Only the sum carries gradients; the per-token values are
    for metrics.
    """
    chunk_tokens = chunk_tokens or auto_chunk_tokens(*weight.shape)
    grads_for = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, vocab, float(label_smoothing), chunk_tokens,
                                            grads_for)


@functools.cache
def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross entropy, or None when it is not installed or older than 0.8.2."""
    try:
        version = tuple(int(part) for part in importlib.metadata.version("liger-kernel").split(".")[:3])
        if version < LIGER_MIN_VERSION:
            return None
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fused
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    return fused


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               label_smoothing: float, per_token_losses: bool):
    """As `chunked_linear_cross_entropy` (whole vocabulary), with Liger-Kernel's Triton kernel.

    Liger computes the gradients in the forward only for a summed loss; per-token losses (needed when a micro-batch
    mixes dataset types, for the per-type metrics) make it recompute the logits in backward. Without them, each
    token's loss is reported as the micro-batch mean, which sums to the same per-type total.
    """
    out = liger_fused_linear_cross_entropy()(hidden, weight, labels, label_smoothing=label_smoothing,
                                             reduction="none" if per_token_losses else "sum",
                                             accum_dtype=torch.float32, return_predicted_tokens=True)
    if per_token_losses:
        return out.loss.sum(), out.loss.detach(), out.predicted_tokens
    mean = out.loss.detach() / max(len(labels), 1)
    return out.loss, mean.expand(len(labels)), out.predicted_tokens


def choose_loss_kernel(requested: str, device_type: str, vocab_split: bool, liger_installed: bool | None = None) -> str:
    """The loss kernel for `loss.kernel=requested`: "liger", "chunked" or "full" (logits materialised whole).

    "auto" is Liger where it can run (CUDA, liger-kernel >= 0.8.2, the vocabulary not split over tensor ranks), else
    "chunked". Asking for "liger" where it cannot run is a ValueError that says why.
    """
    if requested not in LOSS_KERNELS:
        raise ValueError(f"loss.kernel={requested!r}; expected one of {', '.join(map(repr, LOSS_KERNELS))}")
    if requested not in ("auto", "liger"):
        return requested
    if liger_installed is None:
        liger_installed = liger_fused_linear_cross_entropy() is not None
    why_not = None
    if device_type != "cuda":
        why_not = "it needs CUDA"
    elif not liger_installed:
        why_not = f"it needs liger-kernel>={'.'.join(map(str, LIGER_MIN_VERSION))}"
    elif vocab_split:
        why_not = "the tensor-parallel head splits the vocabulary, which Liger's kernel does not"
    if requested == "auto":
        return "chunked" if why_not else "liger"
    if why_not:
        raise ValueError(f"loss.kernel='liger' cannot run here: {why_not}; use loss.kernel='auto' (Liger where it "
                         f"can run, else the chunked torch loss) or 'chunked'")
    return "liger"
