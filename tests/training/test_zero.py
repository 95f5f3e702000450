"""DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload train exactly like ZeRO-1 (issue: ZeRO-2 and ZeRO-3 with CPU
offload): the same losses, gradient norms, loss scales and inf/nan skips, the stage on the metrics line, and a ZeRO-3
model that no rank ever holds whole yet starts from the weights an unsharded build makes.

One launch of two ranks trains every variant in turn (data parallel 2, or tensor parallel 2 for the `_tp2` ones).
"""
import json
import math
from pathlib import Path

import pytest

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config, zero3_ds_config

STEPS = 4
INF_BATCH = 1  # the second batch's loss is inf: the step is skipped, as an fp16 overflow would be
VARIANTS = {  # name: the parallel section
    "zero1": dict(zero=dict(stage=1)),
    "zero2": dict(zero=dict(stage=2)),
    "zero3": dict(zero1=dict(size=-1, fsdp=True)),  # InternEvo's key for it
    "zero3_offload_optimizer": dict(zero=dict(stage=3, offload_optimizer=True)),
    "zero3_offload_all": dict(zero=dict(stage=3, offload_optimizer=True, offload_param=True)),
    "zero1_tp2": dict(zero=dict(stage=1), tensor=2),
    "zero2_tp2": dict(zero=dict(stage=2), tensor=2),
    "zero2_tp2_sequence_parallel": dict(zero=dict(stage=2), tensor=2, sequence_parallel=True),
}


def ds_override(root: str, parallel: dict) -> str | None:
    """The ZeRO-3 variants shard the tiny model's matrices (zero3_ds_config)."""
    stage = parallel.get("zero", {}).get("stage", 3)
    return zero3_ds_config(root) if stage == 3 else None


def config(parallel: dict):
    return tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=STEPS - 1),
                       model=dict(dtype="torch.float32"), parallel=parallel,
                       lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0))


class InfAtBatch:
    """The run's loss, times inf in every micro-batch of batch INF_BATCH."""

    def __init__(self, loss_fn, micro_num: int):
        self.loss_fn, self.micro_num, self.calls = loss_fn, micro_num, 0

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)

    def __call__(self, hidden_states, targets):
        batch, self.calls = self.calls // self.micro_num, self.calls + 1
        loss = self.loss_fn(hidden_states, targets)
        return loss * math.inf if batch == INF_BATCH else loss


def unsharded_build_matches(cfg, trainer, run_root: str) -> dict:
    """Build the model as the trainer does under ZeRO-3 and check it against an unsharded build from the same seed."""
    import torch

    from evods.config import build_deepspeed_config
    from evods.parallel.zero import count_parameters, gathered, is_sharded, model_construction
    from evods.training.trainer import build_model

    torch.manual_seed(1024)
    whole = build_model(cfg)
    torch.manual_seed(1024)
    ds_config = build_deepspeed_config(cfg, trainer.layout, ds_override(run_root, {}))
    with model_construction(3, ds_config, trainer.grid.get_data_parallel_group()):
        sharded = build_model(cfg)
    params = list(sharded.parameters())
    held = sum(param.ds_tensor.numel() for param in params)
    with gathered(params):
        same = all(torch.equal(param, whole.get_parameter(name)) for name, param in sharded.named_parameters())
    return {"all_sharded": all(is_sharded(p) and p.numel() == 0 for p in params), "same_weights": same,
            "held_share": held / count_parameters(sharded)}


def train_variants(run_root: str) -> dict:
    import torch

    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    results = {}
    for name, parallel in VARIANTS.items():
        cfg = config(parallel)
        trainer = Trainer(cfg, run_dir=Path(run_root) / name, ds_config_override=ds_override(run_root, parallel))
        trainer.engine.loss_fn = InfAtBatch(trainer.engine.loss_fn, cfg.data.micro_num)
        state = trainer.train()
        trainer.close()
        results[name] = {
            "history": [(e["loss"], e["grad_norm"], e["loss_scale"], e["applied"]) for e in state.history],
            "skipped": state.inf_nan_skip_batches,
            "optimizer": type(trainer.engine.engine.basic_optimizer).__name__,
            "zero": type(trainer.engine.engine.optimizer).__name__,
        }
        if name == "zero3_offload_all":
            results[name]["build"] = unsharded_build_matches(cfg, trainer, run_root)
            results[name]["sharded_in_training"] = {
                name: param.numel() == 0 for name, param in trainer.engine.engine.module.named_parameters()}
        del trainer
        torch.manual_seed(0)
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    return root, run_distributed(train_variants, world=2, args=(str(root),))


def assert_same_training(reference: list, history: list, name: str) -> None:
    assert len(history) == STEPS and [entry[3] for entry in history] == [step != INF_BATCH for step in range(STEPS)]
    for step, (expected, got) in enumerate(zip(reference, history)):
        if step == INF_BATCH:
            assert not math.isfinite(got[0]) and got[2] == expected[2], (name, got)
            continue
        assert math.isclose(got[0], expected[0], rel_tol=1e-5), (name, step, got, expected)
        assert math.isclose(got[1], expected[1], rel_tol=1e-5), (name, step, got, expected)
        assert got[2] == expected[2] == 1.0, (name, got)  # fp32: no loss scaling in any stage


def test_zero2_and_zero3_with_offload_train_like_zero1(trained):
    root, ranks = trained
    for rank in ranks:
        for name, result in rank.items():
            reference = rank["zero1_tp2" if "tp2" in name else "zero1"]
            assert_same_training(reference["history"], result["history"], name)
            assert result["skipped"] == 1, name  # inf_nan_skip_batches counts the skipped step
        losses = [entry[0] for entry in rank["zero1"]["history"] if math.isfinite(entry[0])]
        assert len(set(losses)) == STEPS - 1, "training moves"
    rank0 = ranks[0]
    assert [rank0[name]["zero"] for name in ("zero1", "zero2", "zero3")] == [
        "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"]
    # optimizer offload on the CPU accelerator steps the host-side shards with torch's AdamW (evods.config.checks)
    assert rank0["zero3_offload_all"]["optimizer"] == "AdamW"
    for name, parallel in VARIANTS.items():
        line = json.loads((root / name / "metrics.jsonl").read_text().splitlines()[0])
        stage = parallel.get("zero", {}).get("stage", 3)
        assert line["zero_stage"] == stage and line["inf_nan_skip_batches"] == 0, (name, line)


def test_a_zero3_model_is_built_sharded_with_the_unsharded_weights(trained):
    _, ranks = trained
    for rank in ranks:
        build = rank["zero3_offload_all"]["build"]
        assert build["all_sharded"] and build["same_weights"], build
        assert build["held_share"] < 0.55, build  # this rank's half, plus the shards' padding
        # between steps only DeepSpeed's persistent parameters (here below 100 elements: norms, biases) are whole
        sharded = rank["zero3_offload_all"]["sharded_in_training"]
        assert {name for name, empty in sharded.items() if not empty} <= {
            name for name in sharded if name.endswith(("bias", "norm.weight", "layernorm.weight"))}
        assert sharded["lm_head.weight"] and sharded["model.embed_tokens.weight"]
