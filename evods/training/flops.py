"""Throughput numbers of the metrics line: InternEvo's tflops and tgs (as
record_current_batch_training_metrics computes them), plus model FLOPs and MFU."""
import os

# Dense bf16/fp16 tensor-core peaks per device, in FLOP/s. Matched by substring of the device name, first match wins
# (so the PCIe H100 comes before the SXM one).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("V100", 125e12),
)
PEAK_TFLOPS_ENV = "EVODS_PEAK_TFLOPS"  # per-device peak in TFLOP/s, for devices not in the table (or to correct it)


def _flops_per_token(passes: int, seq_len: int, hidden: int, num_layers: int, vocab: int, mlp_ratio: float,
                     swiglu: bool, kv_ratio: float = 1.0) -> float:
    """Megatron's count per token: `passes` × the layers (3 = fwd + 2×bwd, 4 with recompute) plus the LM head (fwd +
    bwd, never recomputed). Attention is counted over the full sequence, as InternEvo does. `kv_ratio`: KV heads /
    query heads; the k and v projections of grouped-query attention are that much smaller than q and o."""
    if swiglu:
        mlp_ratio *= 1.5  # three MLP matrices instead of two: 8/3 -> 4
    layer = (4 + 4 * kv_ratio + 4 * mlp_ratio) * hidden**2 + 4 * seq_len * hidden
    return passes * layer * num_layers + 6 * hidden * vocab


def megatron_tflops(elapsed: float, checkpoint, seq_len: int, hidden: int, num_layers: int, vocab: int,
                    global_batch_size: int, world_size: int, mlp_ratio: float, swiglu: bool = True) -> float:
    """InternEvo's logged `tflops` per device. global_batch_size counts seq_len rows: micro_bsz × micro_num × dp.
    `checkpoint` is the recompute ratio; any recompute counts the layers' forward twice, as InternEvo."""
    passes = 4 if checkpoint else 3
    tokens = global_batch_size * seq_len
    flops = tokens * _flops_per_token(passes, seq_len, hidden, num_layers, vocab, mlp_ratio, swiglu)
    return flops / (elapsed * world_size * 1e12)


def model_flops_per_token(seq_len: int, hidden: int, num_layers: int, vocab: int, mlp_ratio: float,
                          swiglu: bool = True, kv_ratio: float = 1.0) -> float:
    """Training FLOPs the model needs per token (forward + backward, no recompute): the numerator of MFU. Unlike
    InternEvo's `tflops` (`megatron_tflops`), it counts the smaller k and v of grouped-query attention (`kv_ratio`:
    KV heads / query heads)."""
    return _flops_per_token(3, seq_len, hidden, num_layers, vocab, mlp_ratio, swiglu, kv_ratio)


def tgs(num_tokens_this_rank: int, dp: int, world: int, elapsed: float) -> float:
    """InternEvo's `tgs (tokens/gpu/second)`: this rank's tokens (micro_num × packed_length, padding included) × dp,
    spread over all devices."""
    return round(num_tokens_this_rank * dp / world / elapsed, 2)


def peak_flops(override_tflops: float | None = None, device_name: str | None = None) -> float | None:
    """A device's peak FLOP/s for MFU: the override (e.g. --peak_tflops), else $EVODS_PEAK_TFLOPS, else the table entry
    for `device_name` (default: the current CUDA device). None when unknown, e.g. on CPU: then MFU is not reported."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if os.environ.get(PEAK_TFLOPS_ENV):
        return float(os.environ[PEAK_TFLOPS_ENV]) * 1e12
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for name, peak in PEAK_FLOPS if name in device_name), None)


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation, or None without a known peak."""
    return None if not peak_flops_per_s else achieved_flops_per_s / peak_flops_per_s
