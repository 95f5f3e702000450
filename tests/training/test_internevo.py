"""Training as InternEvo users expect it, on two ranks: rampup_batch_size makes each batch one optimizer update over its
own rows (the loss of each micro-batch divided by that batch's row count), with no false inf/nan skips, on the plain
and the pipeline engine; a model too large for the machine is refused on every rank before it is built."""
import math
import os
import re
from pathlib import Path

import pytest

from testkit.distributed import run_distributed
from testkit.train_configs import tiny_config

STEPS = 6
MICRO_NUM, RAMPUP = 3, "1 1 2"
RAMPUP_ROWS = [1, 1, 2, 2, 3, 3]  # rows per update: from 1, one more every 2 batches, up to micro_num


RUNS = {  # name: (tensor, pipeline, micro_num, rampup_batch_size); two ranks, one data-parallel rank each
    "one_row": (2, 1, 1, ""),
    "rampup": (2, 1, MICRO_NUM, RAMPUP),  # the plain engine (tensor parallel)
    "rampup_pipeline": (1, 2, MICRO_NUM, RAMPUP),
}


def train(run_root: str) -> dict:
    """Train each run in turn; what each one did."""
    from evods.config import ConfigError
    from evods.training.distributed import init_distributed
    from evods.training.memory import MEMORY_LIMIT_ENV
    from evods.training.trainer import Trainer

    init_distributed("torch")
    results = {}
    if os.environ["RANK"] == "1":  # only one rank lacks memory: both must stop, neither may wait for the other
        os.environ[MEMORY_LIMIT_ENV] = "0.0001"
    try:
        Trainer(tiny_config(), run_dir=Path(run_root) / "too_big")
    except ConfigError as refused:
        results["refused"] = str(refused)
    os.environ.pop(MEMORY_LIMIT_ENV, None)
    for name, (tensor, pipeline, micro_num, rampup) in RUNS.items():
        cfg = tiny_config(
            data=dict(seq_len=32, micro_bsz=2, micro_num=micro_num, rampup_batch_size=rampup, total_steps=STEPS),
            model=dict(dtype="torch.float32"),
            parallel=dict(pipeline=dict(size=pipeline), zero1=-1, tensor=tensor),
            lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0),
        )
        trainer = Trainer(cfg, run_dir=Path(run_root) / name)
        state = trainer.train()
        engine = trainer.engine.engine
        results[name] = dict(history=state.history, step_count=state.step_count, skips=state.inf_nan_skip_batches,
                             deepspeed_updates=engine.global_steps, deepspeed_samples=engine.global_samples)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(train, world=2, args=(str(tmp_path_factory.mktemp("rampup")),))


def assert_rampup_trains_right(run: dict, one_row: dict) -> None:
    history = run["history"]
    assert [entry["micro_num"] for entry in history] == RAMPUP_ROWS
    assert all(entry["applied"] for entry in history) and run["skips"] == 0
    assert run["step_count"] == run["deepspeed_updates"] == STEPS  # one DeepSpeed update per batch
    assert run["deepspeed_samples"] == sum(RAMPUP_ROWS)  # DeepSpeed counted each batch at its own size
    # The 1-row batches read the same packs as a micro_num=1 run (the same shuffle): the same updates
    for entry, reference in zip(history[:2], one_row["history"][:2]):
        assert math.isclose(entry["grad_norm"], reference["grad_norm"], rel_tol=1e-5), (entry, reference)
        assert math.isclose(entry["loss"], reference["loss"], rel_tol=1e-5), (entry, reference)
    assert len({entry["loss"] for entry in history}) == STEPS


@pytest.mark.parametrize("name", ["rampup", "rampup_pipeline"])
def test_rampup_updates_once_per_batch_over_its_rows(ranks, name):
    for rank in ranks:  # every rank reports the same loss and global grad norm
        assert [entry["micro_num"] for entry in rank["one_row"]["history"]] == [1] * STEPS
        assert_rampup_trains_right(rank[name], rank["one_row"])


def test_too_little_memory_on_one_rank_stops_every_rank_up_front(ranks):
    messages = {rank["refused"] for rank in ranks}
    assert len(messages) == 1
    message = messages.pop()
    assert re.fullmatch(r".*demo_cpu\.py: the model does not fit: a rank needs about \d+\.\d MiB \(building the "
                        r"whole model in fp32: \d+\.\d MiB; training: weights .*\) but has 0\.1 MiB "
                        r"\(EVODS_MEMORY_LIMIT_GB=0\.0001\); use more ranks .*", message), message
