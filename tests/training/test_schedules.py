"""InternEvo's LR and beta2 schedules: the quickstart's logged values and the schedule shapes."""
import math

import pytest
import torch

from evods.config import AdamConfig, Beta2SchedulerConfig, LrSchedulerConfig
from evods.training.schedules import Beta2Scheduler, LRScheduler, beta2_at, lr_at


def optimizer(lr=1e-4, betas=(0.9, 0.95)):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, betas=betas)


def lr_config(**values):
    defaults = dict(total_steps=50000, init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)
    return LrSchedulerConfig(**{**defaults, **values})


def test_quickstart_log_lr_values():
    opt = optimizer()
    scheduler = LRScheduler(opt, AdamConfig().lr, lr_config())
    assert opt.param_groups[0]["lr"] == 1e-4 / 500  # lr(0), set when the scheduler is built
    logged = []
    for _ in range(4):  # the loop steps the scheduler after each successful step, then logs the lr
        scheduler.step()
        logged.append(opt.param_groups[0]["lr"])
    # exactly the floats printed in the quickstart log for steps 0..3
    assert logged == [4.0000000000000003e-07, 6.000000000000001e-07, 8.000000000000001e-07, 1.0000000000000002e-06]


def test_cosine_after_warmup():
    base, eta_min = 1e-3, 1e-4
    values = dict(base_lr=base, total_steps=110, init_steps=0, warmup_steps=10, eta_min=eta_min)
    assert lr_at(9, **values) == pytest.approx(base)  # warmup ends at base
    assert lr_at(10, **values) == pytest.approx(base)
    assert lr_at(60, **values) == pytest.approx((base + eta_min) / 2)  # cosine midpoint
    assert lr_at(110, **values) == pytest.approx(eta_min)
    lrs = [lr_at(t, **values) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_init_steps_hold_lr_at_zero_then_warm_up():
    values = dict(base_lr=1.0, total_steps=100, init_steps=5, warmup_steps=4, eta_min=0.0)
    assert [lr_at(t, **values) for t in range(10)] == [0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_beta2_schedule():
    assert beta2_at(100, 0.95, 0) == 0.95
    assert beta2_at(1, 0.95, 0.8) == 0.95
    assert beta2_at(1000, 0.95, 0.8) == pytest.approx(1 - 1000**-0.8)
    opt = optimizer(betas=(0.8, 0.95))
    scheduler = Beta2Scheduler(opt, Beta2SchedulerConfig(init_beta2=0.95, c=0.8, cur_iter=-1))
    for _ in range(1000):
        scheduler.step()
    assert opt.param_groups[0]["betas"] == (0.8, pytest.approx(1 - 1000**-0.8))
    assert scheduler.get_beta2() == pytest.approx(0.996018928)


def test_state_dict_round_trip_resumes_the_schedules():
    opt = optimizer()
    lr, beta2 = LRScheduler(opt, 1e-3, lr_config(total_steps=100)), Beta2Scheduler(
        opt, Beta2SchedulerConfig(init_beta2=0.9, c=0.5, cur_iter=-1))
    for _ in range(37):
        lr.step()
        beta2.step()
    saved = (lr.state_dict(), beta2.state_dict())

    resumed_opt = optimizer()
    resumed_lr = LRScheduler(resumed_opt, 1e-3, lr_config(total_steps=100))
    resumed_beta2 = Beta2Scheduler(resumed_opt, Beta2SchedulerConfig(init_beta2=0.9, c=0.5, cur_iter=-1))
    resumed_lr.load_state_dict(saved[0])
    resumed_beta2.load_state_dict(saved[1])
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert resumed_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    lr.step()
    resumed_lr.step()
    # 38 steps since construction: 1 warmup step, then 37 of the 99 cosine steps
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(
        1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 37 / 99)) / 2)
