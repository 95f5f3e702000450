"""Checkpoints: the evods format, loading it at start and saving it during training; `formats/` reads and writes the
other formats (InternEvo native, Hugging Face InternLM and Llama) and converts between them.

    checkpoints = CheckpointManager(cfg.ckpt, layout, model.config, cfg.source.text)
    checkpoints.loader.load_model_weights(model)     # before the DeepSpeed engine is built
    checkpoints.loader.load_split_model_weights(model, embed_split_hidden)  # an HF folder: after the tensor split
    checkpoints.loader.restore(parts)                # after: optimizer, schedulers, sampler, counters, RNG
    quit = checkpoints.saver.after_step(step_count, parts)
    checkpoints.saver.close()                        # waits for background uploads, writes the last marker

    manager.py      the two sides for one run (and the clean-up of scratch folders crashed runs left)
    layout.py       what an evods checkpoint folder holds; which checkpoints are complete (the step marker)
    marker.py       what the step marker records: each file's size and checksum
    run_state.py    the run's parts besides the model, and how their state is stored
    resume/         loading at start:
        plan.py         which checkpoint (auto_resume, load_ckpt_info, the legacy keys)
        catalogue.py    its file list, read once by rank 0 for every rank
        rank_files.py   which files each rank reads, which rank of a node downloads each
        download.py     the node-local copy (and whole folders for the converters)
        verify.py       local files checked against the step marker
        reshard.py      another data or pipeline size, through DeepSpeed's universal checkpoint
        loader.py       the steps above, in order; falls back to the previous checkpoint if one is damaged
    save/           saving during training:
        policy.py       when: every N steps, snapshots, the stop file
        upload.py       sending files to the storage, at once or in the background
        saver.py        the save, completed by the step marker; keep_last_ckpts
    safe_load.py    reading torch files weights-only, so that a checkpoint cannot run code
    deepspeed_io.py DeepSpeed's checkpoint engine with checksums, fsync, kept write errors, weights-only loads
    collective.py, rng.py, errors.py

Other formats (formats/):
    weights.py            HF-named model weights from HF folders and DeepSpeed files, any tensor size merged
    checkpoint_model.py   the config and full weights of any checkpoint folder, whatever its format; whether a
                          folder is a training checkpoint at all
    internevo_layout.py   InternEvo's native model files described as data (names of InternLM's, InternLM2's
                          grouped wqkv and its LLaMA family, tensor-parallel splits)
    internevo.py          reading and writing InternEvo native checkpoint folders
    internevo_export.py   any checkpoint as an InternEvo native checkpoint at any tensor/pipeline size
    hf.py                 any checkpoint as a Hugging Face folder (InternLM or InternLM2 with remote code, or
                          stock Llama)
    hf_internlm2.py       InternLM's published InternLM2 HF layout, read into and written from evods' names
    hf_start.py           an HF folder (hf_llama, hf, hf_model) as a training start: checked before the model is
                          built, then each rank reads its pipeline stage's tensors and its tensor slices of them
    hf_tokenizer.py       the tokenizer files of that folder (slow, fast, chat template)
"""
from .errors import CheckpointError
from .formats.checkpoint_model import is_training_checkpoint, read_checkpoint_model
from .formats.hf_tokenizer import write_tokenizer
from .formats.internevo import read_native_model, write_native_checkpoint
from .formats.internevo_export import export_native
from .formats.internevo_layout import MLP_NAMINGS, NativeLayout
from .formats.weights import WeightsError, deepspeed_weights, hf_weights, load_weights
from .layout import CheckpointRef, complete_checkpoints, latest_checkpoint
from .manager import CheckpointManager
from .resume.loader import CheckpointLoader
from .resume.plan import LoadPlan, choose_load_plan
from .run_state import TrainingParts
from .save.policy import SaveDecision, SavePolicy, StopFile
from .save.saver import CheckpointSaver

__all__ = [
    "CheckpointError", "CheckpointLoader", "CheckpointManager", "CheckpointRef", "CheckpointSaver", "LoadPlan",
    "MLP_NAMINGS", "NativeLayout", "SaveDecision", "SavePolicy", "StopFile", "TrainingParts", "WeightsError",
    "choose_load_plan", "complete_checkpoints", "deepspeed_weights", "export_native", "hf_weights",
    "is_training_checkpoint", "latest_checkpoint", "load_weights", "read_checkpoint_model", "read_native_model",
    "write_native_checkpoint", "write_tokenizer",
]
