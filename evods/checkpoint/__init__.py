"""Checkpoints. This package is the evods format and the manager a run talks to; `formats/` reads and writes the
other formats (InternEvo native, Hugging Face InternLM and Llama) and converts between them.

    manager = CheckpointManager(cfg.ckpt, sizes, model.config, cfg.source.text)
    manager.load_model_weights(model)        # before the DeepSpeed engine is built
    manager.restore(parts)                   # after: optimizer, schedulers, sampler, counters, RNG
    quit = manager.after_step(step_count, parts)
    manager.close()                          # waits for background uploads, writes the last marker

The evods format and its manager:
    layout.py      what an evods checkpoint folder holds; which checkpoints are complete (the step marker)
    manager.py     what to load at start, when and what to save, the atomic completion of a save
    policy.py      when to save: every N steps, snapshots, the stop file
    sources.py     which checkpoint to load at start (auto_resume, load_ckpt_info) and how to read its weights
    reshard.py     resuming at another data/pipeline size through DeepSpeed's universal checkpoint
    selection.py   which files of a checkpoint each rank reads, and which rank of a node downloads each
    local_copy.py  a checkpoint to load as a local folder: downloaded once per node, each rank its share
    transfer.py    moving files between the local disk (where DeepSpeed works) and the checkpoint storage
    integrity.py   what the step marker records (each file's size and checksum) and the checks built on it
    safe_load.py   reading torch files weights-only, so that a checkpoint cannot run code
    deepspeed_io.py  DeepSpeed's checkpoint engine with checksums, fsync, kept write errors, weights-only loads
    rng.py, collective.py, errors.py

Other formats (formats/):
    weights.py            HF-named model weights from HF folders and DeepSpeed files, any tensor size merged
    checkpoint_model.py   the config and full weights of any checkpoint folder, whatever its format
    internevo_layout.py   InternEvo's native model files described as data (names of InternLM's and of its LLaMA
                          family, tensor-parallel splits)
    internevo.py          reading and writing InternEvo native checkpoint folders
    internevo_export.py   any checkpoint as an InternEvo native checkpoint at any tensor/pipeline size
    hf.py                 any checkpoint as a Hugging Face folder (InternLM with remote code, or stock Llama)
    hf_tokenizer.py       the tokenizer files of that folder (slow, fast, chat template)
"""
from .errors import CheckpointError
from .formats.checkpoint_model import read_checkpoint_model
from .formats.internevo import read_native_model, write_native_checkpoint
from .formats.internevo_export import export_native
from .formats.internevo_layout import MLP_NAMINGS, NativeLayout
from .formats.weights import WeightsError, deepspeed_weights, hf_weights, load_weights
from .layout import CheckpointRef, complete_checkpoints, latest_checkpoint
from .manager import CheckpointManager, TrainingParts
from .policy import SaveDecision, SavePolicy, StopFile
from .sources import LoadPlan, choose_load_plan

__all__ = [
    "CheckpointError", "CheckpointManager", "CheckpointRef", "LoadPlan", "MLP_NAMINGS", "NativeLayout", "SaveDecision",
    "SavePolicy", "StopFile", "TrainingParts", "WeightsError", "choose_load_plan", "complete_checkpoints",
    "deepspeed_weights", "export_native", "hf_weights", "latest_checkpoint", "load_weights", "read_checkpoint_model",
    "read_native_model", "write_native_checkpoint",
]
