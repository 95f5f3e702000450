"""The up-front memory check: an estimate of each rank's bytes against free memory, before the model is built."""
import logging
import re
from dataclasses import replace

import pytest
import torch

from evods.config import ConfigError, check_topology, load_config
from evods.parallel import ParallelLayout, parallel_layout
from evods.training.memory import GIB, MEMORY_LIMIT_ENV, check_memory, estimate_memory, host_available_bytes
from evods.training.trainer import build_model
from testkit.train_configs import DEMO_CONFIG, tiny_config

QUICKSTART = DEMO_CONFIG.with_name("7B_sft.py")


def meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg)


def test_estimate_follows_the_model_and_the_layout():
    cfg = tiny_config(model=dict(dtype="torch.float32"))
    params = build_model(cfg).num_parameters()
    shape = meta_model(cfg)
    one = estimate_memory(cfg, shape, ParallelLayout(dp=1, pp=1, tp=1))
    assert one.build == 4 * params and one.weights == 4 * params  # fp32: 4 bytes a parameter
    assert one.gradients == 8 * params and one.optimizer == 12 * params  # grads + ZeRO-1's fp32 partition; master+Adam
    sharded = estimate_memory(cfg, shape, ParallelLayout(dp=4, pp=1, tp=1))
    assert sharded.optimizer == one.optimizer // 4 and sharded.weights == one.weights  # ZeRO-1 shards the optimizer
    split = estimate_memory(cfg, shape, ParallelLayout(dp=1, pp=1, tp=2))
    assert split.weights == one.weights // 2 and split.activations < one.activations
    # isp: every weight whole, ZeRO over the 2 ranks of a row, each rank 1/2 of the row's tokens
    isp = estimate_memory(cfg, shape, ParallelLayout(dp=1, pp=1, tp=1, sp=2))
    assert isp.weights == one.weights and isp.optimizer == sharded.optimizer * 2
    assert one.activations / 2 < isp.activations < one.activations * 0.55  # (the head's vocab-sized buffers stay)
    staged = estimate_memory(cfg, shape, ParallelLayout(dp=1, pp=2, tp=1))
    assert staged.weights < one.weights and staged.build == one.build  # the fp32 build is the whole model
    recompute = estimate_memory(tiny_config(model=dict(dtype="torch.float32", checkpoint=True)), shape,
                                ParallelLayout(dp=1, pp=1, tp=1))
    assert recompute.activations < one.activations
    bf16 = tiny_config(model=dict(dtype="torch.bfloat16"))
    half = estimate_memory(bf16, meta_model(bf16), ParallelLayout(dp=1, pp=1, tp=1))
    assert half.weights == 2 * params and half.gradients == 6 * params  # bf16 grads + DeepSpeed's fp32 accumulation


def test_lora_estimate_counts_gradients_and_optimizer_states_of_the_adapters_only():
    from evods.model.lora import add_lora

    cfg = tiny_config(model=dict(dtype="torch.float32"), lora=dict(r=4))
    full = estimate_memory(cfg, meta_model(cfg), ParallelLayout(dp=1, pp=1, tp=1))
    adapted = meta_model(cfg)
    add_lora(adapted, cfg.lora.spec())
    lora = estimate_memory(cfg, adapted, ParallelLayout(dp=1, pp=1, tp=1))
    adapters = sum(param.numel() for param in adapted.parameters() if param.requires_grad)
    assert lora.weights == full.weights + 4 * adapters and lora.activations == full.activations
    assert lora.optimizer == 12 * adapters and lora.gradients == 8 * adapters  # fp32 master + Adam; grads + partition
    assert lora.optimizer < 0.1 * full.optimizer


def test_7b_on_a_4_gib_machine_is_refused_before_it_is_built(monkeypatch):
    cfg = load_config(QUICKSTART)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "4")
    with pytest.raises(ConfigError) as refused:
        check_memory(cfg, meta_model(cfg), parallel_layout(0, 8, pp=1, tp=1), "cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert re.fullmatch(re.escape(str(QUICKSTART)) + r": the model does not fit: a rank needs about 60\.1 GiB "
                        r"\(building the whole model in fp32: 27\.3 GiB; training: weights 13\.6 GiB, gradients "
                        r"17\.0 GiB, fp32 master \+ Adam 10\.2 GiB \(ZeRO-1 over 8\), activations ~19\.1 GiB\) but has "
                        r"4\.0 GiB \(EVODS_MEMORY_LIMIT_GB=4\); use more ranks .* \(or set EVODS_MEMORY_LIMIT_GB "
                        r"if the measurement is wrong\)", message), message
    # on a GPU the fp32 build takes host memory and training device memory, each checked against its own
    with pytest.raises(ConfigError, match=r"needs about 60\.1 GiB \(training: weights 13\.6 GiB, gradients "
                                          r"17\.0 GiB, "):
        check_memory(cfg, meta_model(cfg), parallel_layout(0, 8, pp=1, tp=1), "cuda")
    # the whole [tokens, 103168] logits, their fp32 copy and gradient (loss.kernel="full") cost 1.8 GiB more
    full = estimate_memory(replace(cfg, loss=replace(cfg.loss, kernel="full")), meta_model(cfg),
                           ParallelLayout(dp=8, pp=1, tp=1))
    chunked = estimate_memory(cfg, meta_model(cfg), ParallelLayout(dp=8, pp=1, tp=1))
    assert (full.activations - chunked.activations) / GIB == pytest.approx(1.8, abs=0.05)


def test_tight_memory_warns_and_a_small_model_fits_the_host(monkeypatch, caplog):
    cfg = tiny_config(model=dict(dtype="torch.float32"))
    layout = parallel_layout(0, 1, pp=1, tp=1)
    estimate = estimate_memory(cfg, meta_model(cfg), ParallelLayout(dp=1, pp=1, tp=1))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(max(estimate.training, estimate.build) * 1.05 / GIB))
    with caplog.at_level(logging.WARNING, logger="evods"):
        check_memory(cfg, meta_model(cfg), layout, "cpu")
    assert "memory is tight: a rank needs about" in caplog.text
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    meminfo = dict(line.split(":") for line in open("/proc/meminfo"))
    assert 0 < host_available_bytes() <= int(meminfo["MemTotal"].split()[0]) * 1024
    assert check_memory(cfg, meta_model(cfg), layout, "cpu") == estimate  # measured host memory: fits
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ConfigError, match=r"EVODS_MEMORY_LIMIT_GB='lots' must be a number of GiB"):
        check_memory(cfg, meta_model(cfg), layout, "cpu")


def test_zero_stages_and_offload_change_the_estimate(monkeypatch):
    def estimate(zero: dict, dp: int = 4):
        # gradients are whole only in DeepSpeed's reduce bucket, here smaller than the model
        cfg = tiny_config(model=dict(dtype="torch.float32"), parallel=dict(zero=zero),
                          hybrid_zero_optimizer=dict(reduce_bucket_size=4096))
        return estimate_memory(cfg, meta_model(cfg), check_topology(cfg, dp))

    params = build_model(tiny_config(model=dict(dtype="torch.float32"))).num_parameters()
    one, two, three = estimate(dict(stage=1)), estimate(dict(stage=2)), estimate(dict(stage=3))
    assert one.zero_stage == 1 and three.zero_stage == 3
    assert two.weights == one.weights and two.gradients < one.gradients and two.optimizer == one.optimizer
    assert three.weights < one.weights / 2 and three.gradients == two.gradients  # the weights are sharded too
    assert three.build < one.build / 2  # zero.Init: this rank's shards and one module whole
    assert one.offloaded == 0 and one.on_device == one.training
    optimizer = estimate(dict(stage=3, offload_optimizer=True))
    assert optimizer.offloaded == optimizer.optimizer + 4 * params // 4  # master + Adam and the fp32 gradient shard
    both = estimate(dict(stage=3, offload_optimizer=True, offload_param=True))
    assert both.on_device < optimizer.on_device < three.on_device and both.training == three.training
    # the 7B quickstart on 8 ranks, checked on a GPU of 40 GiB: ZeRO-1 does not fit, ZeRO-3 does; with everything
    # offloaded the host takes the optimizer
    cfg = load_config(QUICKSTART)
    layout = check_topology(cfg, 8)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "40")
    with pytest.raises(ConfigError, match=r"ZeRO-1 over 8"):
        check_memory(cfg, meta_model(cfg), layout, "cuda")
    fits = check_memory(cfg, meta_model(cfg), replace(layout, zero_stage=3), "cuda")
    assert fits.on_device < 40 * GIB and fits.zero_stage == 3
    # ZeRO-3's up-front bucket is counted as DeepSpeed gets it: hidden_size² elements, not the config's 512M
    two = estimate_memory(cfg, meta_model(cfg), replace(layout, zero_stage=2))
    assert two.gradients - fits.gradients == (512 * 1024 ** 2 - 4096 ** 2) * 2  # bf16 buckets
    offloaded = check_memory(cfg, meta_model(cfg), replace(layout, zero_stage=3, offload_optimizer=True,
                                                          offload_param=True), "cuda")
    assert offloaded.on_device < fits.on_device and offloaded.offloaded > 10 * GIB
