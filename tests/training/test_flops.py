"""tflops / tgs as InternEvo logs them, checked against the quickstart's 7B log; model FLOPs and MFU."""
import pytest

from evods.training.flops import PEAK_TFLOPS_ENV, megatron_tflops, mfu, model_flops_per_token, peak_flops, tgs

# The 7B quickstart run: 8 GPUs, dp 8, micro_num 4, micro_bsz 2, seq_len 2048 -> 4 × 4096 tokens per rank per step
SEVEN_B = dict(checkpoint=0.0, seq_len=2048, hidden=4096, num_layers=32, vocab=103168, global_batch_size=2 * 4 * 8,
               world_size=8, mlp_ratio=8 / 3)
TOKENS_PER_RANK = 4 * 4096


@pytest.mark.parametrize("logged_tflops, logged_tgs", [(63.27010355651958, 1424.64), (189.83371103277346, 4274.45)])
def test_quickstart_log_steps(logged_tflops, logged_tgs):
    elapsed = TOKENS_PER_RANK / logged_tgs  # tgs is rounded to 2 decimals, so tflops matches to ~1e-6
    assert megatron_tflops(elapsed, **SEVEN_B) == pytest.approx(logged_tflops, rel=1e-5)
    # and back: the elapsed time behind the logged tflops gives the logged tgs (to its last, rounded, digit)
    exact_elapsed = megatron_tflops(1.0, **SEVEN_B) / logged_tflops
    assert tgs(TOKENS_PER_RANK, dp=8, world=8, elapsed=exact_elapsed) == pytest.approx(logged_tgs, abs=0.011)


def test_recompute_counts_the_layers_forward_twice():
    per_token = model_flops_per_token(2048, 4096, 32, 103168, 8 / 3)
    head = 6 * 4096 * 103168
    tokens = 64 * 2048
    assert megatron_tflops(1.0, **SEVEN_B) == pytest.approx(tokens * per_token / 8e12)
    recomputed = megatron_tflops(1.0, **{**SEVEN_B, "checkpoint": 1.0}) * 8e12 / tokens
    assert recomputed - head == pytest.approx((per_token - head) * 4 / 3)


def test_model_flops_count_the_smaller_kv_projections_of_grouped_query_attention():
    # InternLM2-7B: 32 query heads, 8 KV heads: k and v are a quarter of q, 2 × 3/4 × 4096² weights fewer per layer,
    # 2 FLOPs per weight and token, times 3 (forward and backward)
    mha, gqa = (model_flops_per_token(2048, 4096, 32, 92544, 3.5, kv_ratio=r) for r in (1.0, 8 / 32))
    assert mha - gqa == pytest.approx(3 * 32 * 2 * 2 * (3 / 4) * 4096**2)


def test_mfu_needs_a_known_peak(monkeypatch):
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    assert peak_flops(device_name="NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(device_name="NVIDIA H100 PCIe") == 756e12
    assert peak_flops(device_name="NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(device_name="cpu") is None and mfu(1e12, None) is None
    assert peak_flops(200.0, device_name="cpu") == 200e12
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "0.5")
    assert peak_flops(device_name="NVIDIA H100 80GB HBM3") == 0.5e12
    assert mfu(0.25e12, peak_flops()) == 0.5
