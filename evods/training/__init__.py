"""Training on DeepSpeed: the engine (plain or pipeline), the loss, the loop, schedules and metrics; and what your own
loop needs to run evods' model and data through accelerate or transformers' Trainer (hf_accelerate)."""
from .distributed import LaunchError, init_distributed
from .hf_accelerate import deepspeed_accelerator, deepspeed_with_mpu, trainer_accelerator_config
from .schedules import Beta2Scheduler, LRScheduler
from .trainer import Trainer, TrainState, build_model, run, seed_everything

__all__ = [
    "Beta2Scheduler", "LRScheduler", "LaunchError", "TrainState", "Trainer", "build_model", "deepspeed_accelerator",
    "deepspeed_with_mpu", "init_distributed", "run", "seed_everything", "trainer_accelerator_config",
]
