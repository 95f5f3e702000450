"""Checkpoints: the evods format (DeepSpeed state plus the run's state, with an atomic completion marker), the save
policy, auto-resume, and the model weights of HF folders and evods checkpoints.

    manager = CheckpointManager(cfg.ckpt, sizes, model.config, cfg.source.text)
    manager.load_model_weights(model)        # before the DeepSpeed engine is built
    manager.restore(parts)                   # after: optimizer, schedulers, sampler, counters, RNG
    quit = manager.after_step(step_count, parts)
    manager.close()                          # waits for background uploads, writes the last marker
"""
from .errors import CheckpointError
from .layout import CheckpointRef, complete_checkpoints, latest_checkpoint
from .manager import CheckpointManager, TrainingParts
from .policy import SaveDecision, SavePolicy, StopFile
from .sources import LoadPlan, choose_load_plan
from .weights import WeightsError, deepspeed_weights, hf_weights, load_weights

__all__ = [
    "CheckpointError", "CheckpointManager", "CheckpointRef", "LoadPlan", "SaveDecision", "SavePolicy", "StopFile",
    "TrainingParts", "WeightsError", "choose_load_plan", "complete_checkpoints", "deepspeed_weights", "hf_weights",
    "latest_checkpoint", "load_weights",
]
