"""Checkpoints: the evods format (DeepSpeed state plus the run's state, with an atomic completion marker), the save
policy, auto-resume, and the model weights of HF folders and evods checkpoints.

    manager = CheckpointManager(cfg.ckpt, sizes, model.config, cfg.source.text)
    manager.load_model_weights(model)        # before the DeepSpeed engine is built
    manager.restore(parts)                   # after: optimizer, schedulers, sampler, counters, RNG
    quit = manager.after_step(step_count, parts)
    manager.close()                          # waits for background uploads, writes the last marker

Formats besides evods' own: HF folders (ckpt_type "hf"), InternEvo native checkpoints (ckpt_type "internlm" for the
v1 MLP naming, "internevo" for v2; native_format.py describes the files); export_native and hf_export.export_hf
write them. A checkpoint saved at another data/pipeline size resumes through DeepSpeed's universal checkpoint
(reshard.py). Model weights are read whole whatever the tensor size they were saved with (weights.py merges the
tensor ranks), so they load into a run of any tensor size and export to one HF or native checkpoint.
"""
from .errors import CheckpointError
from .layout import CheckpointRef, complete_checkpoints, latest_checkpoint
from .checkpoint_model import read_checkpoint_model
from .manager import CheckpointManager, TrainingParts
from .native import read_native_model, write_native_checkpoint
from .native_export import export_native
from .native_format import MLP_NAMINGS, NativeLayout
from .policy import SaveDecision, SavePolicy, StopFile
from .sources import LoadPlan, choose_load_plan
from .weights import WeightsError, deepspeed_weights, hf_weights, load_weights

__all__ = [
    "CheckpointError", "CheckpointManager", "CheckpointRef", "LoadPlan", "MLP_NAMINGS", "NativeLayout", "SaveDecision",
    "SavePolicy", "StopFile", "TrainingParts", "WeightsError", "choose_load_plan", "complete_checkpoints",
    "deepspeed_weights", "export_native", "hf_weights", "latest_checkpoint", "load_weights", "read_checkpoint_model",
    "read_native_model", "write_native_checkpoint",
]
