"""train_ds.py with faults provoked at given steps, for the alert tests (run it as train_ds.py, under a launcher).

EVODS_TEST_FAULTS is a JSON dict; every entry is optional and names the step (the metrics line's `step`):
    spike_at: the output layer's weights are 1000× larger for that step's forward: the loss really jumps
    inf_at: that step's loss is multiplied by inf, so its gradients are inf and DeepSpeed skips the update
    hang_at, hang_rank, hang_s: that rank sleeps before that step; the other ranks wait for it in a collective
    raise_at, raise_rank: that rank raises RuntimeError("provoked failure") in that step
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ds  # noqa: E402
from evods.training.engine import TrainEngine  # noqa: E402

FAULTS = json.loads(os.environ.get("EVODS_TEST_FAULTS", "{}"))
_train_step = TrainEngine.train_step
_steps = {"next": 0}


class _InfiniteLoss:
    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.head = loss_fn.head  # the engine gathers the head's weight around the loss (ZeRO-3)

    def __call__(self, hidden_states, targets):
        return self.loss_fn(hidden_states, targets) * math.inf


def _head(engine: TrainEngine) -> torch.nn.Linear:
    return engine.engine.module.lm_head


def train_step_with_faults(self: TrainEngine, batch: dict):
    step, rank = _steps["next"], dist.get_rank()
    _steps["next"] += 1
    if step == FAULTS.get("hang_at") and rank == FAULTS.get("hang_rank"):
        time.sleep(FAULTS["hang_s"])
    if step == FAULTS.get("raise_at") and rank == FAULTS.get("raise_rank"):
        raise RuntimeError(f"provoked failure on rank {rank} in step {step}")
    if step == FAULTS.get("spike_at"):
        with torch.no_grad():  # DeepSpeed's optimizer step writes its own fp32 copy back: the next step is normal
            _head(self).weight.mul_(1000.0)
    if step == FAULTS.get("inf_at"):
        self.loss_fn, saved = _InfiniteLoss(self.loss_fn), self.loss_fn
        try:
            return _train_step(self, batch)
        finally:
            self.loss_fn = saved
    return _train_step(self, batch)


if __name__ == "__main__":
    TrainEngine.train_step = train_step_with_faults
    sys.exit(train_ds.main())
