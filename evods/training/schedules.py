"""InternEvo's learning-rate and beta2 schedules (FineTuneCosineAnnealingWarmupLR and Beta2Scheduler in
internlm/solver/), stepped after each successful optimizer step.

The values are pure functions of the number of successful steps; the classes keep that count, write the value into
a torch optimizer's param_groups and save/restore the count. As torch schedulers (and InternEvo's) do, the LR
scheduler takes one step when it is built, so before any training step the lr is lr(0) = base/W, and the lr logged
after step n (read after the scheduler step) is lr(n+1): 4e-7, 6e-7, ... for the 7B config.
"""
import math

import torch

from evods.config import Beta2SchedulerConfig, LrSchedulerConfig


def lr_at(step: int, base_lr: float, total_steps: int, init_steps: int, warmup_steps: int, eta_min: float) -> float:
    """lr after `step` successful steps: 0 before init_steps, linear warmup over warmup_steps, then cosine to eta_min
    at total_steps (torch CosineAnnealingLR with T_max = total_steps - init_steps - warmup_steps)."""
    if step < init_steps:
        return 0.0
    if step < init_steps + warmup_steps:
        return (step + 1 - init_steps) / warmup_steps * base_lr  # this order reproduces InternEvo's floats exactly
    cosine_steps = total_steps - init_steps - warmup_steps
    progress = (step - init_steps - warmup_steps) / cosine_steps
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def beta2_at(step: int, init_beta2: float, c: float) -> float:
    """Adam beta2 after `step` successful steps: constant for c <= 0, else max(init_beta2, 1 - 1/step**c)."""
    if c <= 0 or step < 1:
        return init_beta2
    return max(init_beta2, 1.0 - 1.0 / step**c)


class LRScheduler:
    """`FineTuneCosineAnnealingWarmupLR`: the same lr for every param group, from `adam.lr` and `lr_scheduler`."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, config: LrSchedulerConfig):
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = config.total_steps
        self.init_steps = config.init_steps
        self.warmup_steps = config.warmup_steps
        self.eta_min = config.eta_min
        self.last_epoch = config.last_epoch
        self.step()  # as torch schedulers: -1 -> 0, lr(0) applied before the first training step

    def get_lr(self) -> float:
        return lr_at(self.last_epoch, self.base_lr, self.total_steps, self.init_steps, self.warmup_steps,
                     self.eta_min)

    def step(self) -> None:
        """Call after each successful optimizer step only (a skipped inf/nan step does not advance the schedule)."""
        self.last_epoch += 1
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count; base lr and schedule shape come from the current config, as InternEvo's reload."""
        self.last_epoch = state["last_epoch"] - 1
        self.step()


class Beta2Scheduler:
    """Adam beta2 as InternEvo's `Beta2Scheduler`: `param_group["betas"] = (beta1, beta2)` on every group."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: Beta2SchedulerConfig):
        self.optimizer = optimizer
        self.init_beta2 = config.init_beta2
        self.c = config.c
        self.cur_iter = 0 if config.cur_iter == -1 else config.cur_iter
        self._apply()

    def _apply(self) -> None:
        beta2 = beta2_at(self.cur_iter, self.init_beta2, self.c)
        for group in self.optimizer.param_groups:
            group["betas"] = (group["betas"][0], beta2)

    def get_beta2(self) -> float:
        return self.optimizer.param_groups[0]["betas"][1]

    def step(self) -> None:
        """Call after each successful optimizer step only."""
        self.cur_iter += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"cur_iter": self.cur_iter}

    def load_state_dict(self, state: dict) -> None:
        self.cur_iter = state["cur_iter"]
        self._apply()
