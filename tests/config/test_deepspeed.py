"""The DeepSpeed JSON derived from a training config, and the --ds_config override."""
import json
import logging
from pathlib import Path

import pytest
import torch

from evods.config import (
    ConfigError,
    adamw_kwargs,
    build_deepspeed_config,
    check_topology,
    load_config,
    write_deepspeed_config,
)
from testkit.paths import REPO

CONFIGS = REPO / "configs"
TINY = """\
data = dict(seq_len=16, micro_num=2, micro_bsz=1, total_steps=10)
model = dict(num_attention_heads=4, hidden_size=32, num_layers=2, vocab_size=64, mlp_ratio=2, dtype={dtype!r})
hybrid_zero_optimizer = dict(clip_grad_norm=0.5, reduce_bucket_size=1024)
grad_scaler = dict(fp16=dict(initial_scale={scale}, min_scale=2, growth_interval=7), hysteresis=3)
ckpt = dict(enable_save_ckpt=False)
"""


def tiny(tmp_path: Path, dtype="torch.bfloat16", scale="2**10"):
    path = tmp_path / "cfg.py"
    path.write_text(TINY.format(dtype=dtype, scale=scale))
    return load_config(path)


def deepspeed_json(cfg, world: int, override_path=None) -> dict:
    """The DeepSpeed JSON of `cfg` run by `world` processes."""
    return build_deepspeed_config(cfg, check_topology(cfg, world), override_path)


def write_json(tmp_path: Path, content) -> Path:
    path = tmp_path / "override.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_7b_sft_at_dp8():
    ds = deepspeed_json(load_config(CONFIGS / "7B_sft.py"), world=8)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 512 * 1024 * 1024}
    batch = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    assert batch == (1, 4, 32)
    assert ds["gradient_clipping"] == 1.0
    assert ds["fp16"] == {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                          "min_loss_scale": 1, "consecutive_hysteresis": False}
    assert "bf16" not in ds and "optimizer" not in ds and "scheduler" not in ds


def test_precision_sections_follow_model_dtype(tmp_path):
    ds = deepspeed_json(tiny(tmp_path, "torch.bfloat16"), world=2)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"} and "fp16" not in ds
    for dtype in ("torch.float32", "torch.tf32"):
        ds = deepspeed_json(tiny(tmp_path, dtype), world=2)
        assert not {"fp16", "bf16", "data_types"} & set(ds)
    ds = deepspeed_json(tiny(tmp_path, "torch.half"), world=2)
    assert (ds["fp16"]["initial_scale_power"], ds["fp16"]["loss_scale_window"], ds["fp16"]["hysteresis"],
            ds["fp16"]["min_loss_scale"]) == (10, 7, 3, 2)
    assert (ds["gradient_clipping"], ds["zero_optimization"]["reduce_bucket_size"]) == (0.5, 1024)


def test_fp16_initial_scale_must_be_a_power_of_two(tmp_path):
    with pytest.raises(ConfigError, match=r"grad_scaler\.fp16\.initial_scale=1000 must be a power of 2"):
        deepspeed_json(tiny(tmp_path, "torch.float16", scale="1000"), world=1)


def test_override_is_deep_merged_and_conflicts_warn(tmp_path, caplog):
    override = write_json(tmp_path, {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0,
                                     "steps_per_print": 10})
    with caplog.at_level(logging.WARNING, logger="evods.config"):
        ds = deepspeed_json(tiny(tmp_path), world=2, override_path=override)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1024, "overlap_comm": True}
    assert ds["gradient_clipping"] == 2.0 and ds["steps_per_print"] == 10
    assert [r.message for r in caplog.records] == [
        f"{override}: gradient_clipping=2.0 overrides 0.5 from the training config "
        f"(hybrid_zero_optimizer.clip_grad_norm)."]


def test_override_of_the_batch_geometry_is_an_error(tmp_path):
    override = write_json(tmp_path, {"gradient_accumulation_steps": 8})
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 conflicts with the training config "
                                          r"\(data\.micro_num gives 2\)"):
        deepspeed_json(tiny(tmp_path), world=2, override_path=override)


def test_override_of_the_zero_stage_is_an_error(tmp_path):
    override = write_json(tmp_path, {"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=0 conflicts with the training config "
                                          r"\(parallel\.zero\.stage gives 1\); .* set parallel\.zero\.stage"):
        deepspeed_json(tiny(tmp_path), world=2, override_path=override)


def test_sequence_parallel_pipelines_send_whole_tensors(tmp_path):
    """Each tensor rank holds its own token slice, so DeepSpeed must not split activations over the tensor ranks
    between pipeline stages (it would reassemble one rank's tensor from pieces of every rank's slice)."""
    path = tmp_path / "cfg.py"
    path.write_text(TINY.format(dtype="torch.float32", scale="2**10")
                    + "parallel = dict(tensor=2, pipeline=2, sequence_parallel=True)\n")
    ds = deepspeed_json(load_config(path), world=4)  # dp 1
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    override = write_json(tmp_path, {"pipeline": {"pipe_partitioned": True}})
    with pytest.raises(ConfigError, match=r"pipeline\.pipe_partitioned=True cannot be overridden: each tensor rank "
                                          r"sends its own slice of the tokens"):
        deepspeed_json(load_config(path), world=4, override_path=override)
    assert "pipeline" not in deepspeed_json(tiny(tmp_path), world=1)
    ds = deepspeed_json(tiny(tmp_path), world=1, override_path=override)  # free without the slices
    assert ds["pipeline"] == {"pipe_partitioned": True}


def test_override_is_checked_by_deepspeed(tmp_path):
    override = write_json(tmp_path, {"zero_optimization": {"reduce_bucket_sise": 5}})
    with pytest.raises(ConfigError, match=r"(?s)override\.json: DeepSpeed rejects the config: .*reduce_bucket_sise"):
        deepspeed_json(tiny(tmp_path), world=2, override_path=override)
    with pytest.raises(ConfigError, match=r"override\.json:2: the --ds_config file is not valid JSON"):
        deepspeed_json(tiny(tmp_path), world=2, override_path=write_json(tmp_path, '{\n "a": }'))


def test_effective_json_is_written_to_the_run_folder(tmp_path):
    ds = deepspeed_json(tiny(tmp_path), world=2)
    path = write_deepspeed_config(ds, tmp_path / "run")
    assert path == tmp_path / "run" / "ds_config.json" and json.loads(path.read_text()) == ds


def test_adam_section_builds_torch_adamw(tmp_path):
    cfg = load_config(CONFIGS / "7B_sft.py")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **adamw_kwargs(cfg))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.95), 1e-8, 0.01)
