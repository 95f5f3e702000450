"""Where things live in an evods checkpoint, and which checkpoints under a save folder are complete.

    {save_ckpt_folder}/{step}/             normal checkpoints
    {save_ckpt_folder}/snapshot/{0|1}/     the two alternating snapshots
        deepspeed/...        DeepSpeed's own files: model states (mp_rank_{t}_model_states.pt, or per pipeline layer
                             layer_XX-model_{t}-model_states.pt when pipelined; t the tensor rank; under ZeRO-3
                             zero_pp_rank_{d}_mp_rank_00_model_states.pt per data rank d, without the weights) and
                             ZeRO optimizer partitions (under ZeRO-3 they hold the only copy of the weights, fp32),
                             written by engine.save_checkpoint
        context.pt           training counters (step_count, batch_count, consumed tokens, skips)
        sampler.pt           the data sampler's state
        schedulers.pt        {"lr": ..., "beta2": ...}
        rng/rank{r}.pt       python, numpy and torch RNG states of rank r
        topology.json        {"dp", "pp", "tp", "zero_stage", "num_layers"} of the run that saved it (zero_stage is
                             missing before evods ran ZeRO-2/3: 1)
        config.json          the model's Hugging Face config
        config_file.py       the training config file's text
        adapter_config.json  a LoRA run's only: peft's adapter config; the DeepSpeed files then hold the adapters
                             alone (the frozen base is the model-only checkpoint the run loaded)
        {step}.step          the completion marker, written last (InternEvo's name): JSON with the size and
                             checksum of every other file (marker.py, Manifest)

A folder without its marker is incomplete (a save was interrupted) and is never loaded. The run-state files are
torch files of plain data (and numpy RNG states), read weights-only (safe_load.py).
"""
import logging
from dataclasses import dataclass

from evods.config import SNAPSHOT_FOLDER
from evods.model.lora import ADAPTER_CONFIG  # noqa: F401 - a file of the layout, peft's name
from evods.parallel import ParallelLayout
from evods.storage import Storage

from .errors import DamagedCheckpoint
from .marker import Manifest

logger = logging.getLogger("evods.checkpoint")

DEEPSPEED_TAG = "deepspeed"
CONTEXT = "context.pt"
SAMPLER = "sampler.pt"
SCHEDULERS = "schedulers.pt"
TOPOLOGY = "topology.json"
MODEL_CONFIG = "config.json"
CONFIG_TEXT = "config_file.py"
MARKER_SUFFIX = ".step"
SNAPSHOT_SLOTS = ("0", "1")


def rng_file(rank: int) -> str:
    return f"rng/rank{rank}.pt"


def marker_name(step: int) -> str:
    return f"{step}{MARKER_SUFFIX}"


def topology_record(parallel: ParallelLayout, num_layers: int) -> dict:
    """What topology.json holds: the parallel sizes, the ZeRO stage and the layer count of the run that saved (a
    resume compares its own with them). "dp" is the count of ZeRO partitions, DeepSpeed's data-parallel size (dp × the
    isp ranks of a row); the sampler's own state records the data size it was split over."""
    return {"dp": parallel.zero_ranks, "pp": parallel.pp, "tp": parallel.tp, "zero_stage": parallel.zero_stage,
            "num_layers": num_layers}


def join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A complete checkpoint: its step and its folder relative to the save folder's root."""

    step: int
    folder: str


def marked_step(storage: Storage, folder: str) -> int | None:
    """The step of the `{step}.step` marker in `folder`, or None when the folder has no marker."""
    steps = [int(name[:-len(MARKER_SUFFIX)]) for name in storage.list(folder)
             if name.endswith(MARKER_SUFFIX) and name[:-len(MARKER_SUFFIX)].isdigit()]
    return max(steps) if steps else None


def complete_checkpoints(storage: Storage, report_incomplete: bool = False) -> list[CheckpointRef]:
    """Every complete checkpoint under the root (normal ones and snapshots), oldest first. `report_incomplete` logs
    a line for each folder skipped for want of its marker."""
    found, incomplete = [], []
    for name in storage.list(""):
        if name.isdigit():
            if marked_step(storage, name) == int(name):
                found.append(CheckpointRef(int(name), name))
            else:
                incomplete.append(name)
    for slot in SNAPSHOT_SLOTS:
        folder = join(SNAPSHOT_FOLDER, slot)
        step = marked_step(storage, folder)
        if step is not None:
            found.append(CheckpointRef(step, folder))
        elif storage.list(folder):
            incomplete.append(folder)
    if report_incomplete:
        for folder in incomplete:
            logger.warning("skipping %s: it has no step marker, so its save did not finish", storage.uri(folder))
    # At equal steps the normal checkpoint counts as newer than a snapshot, so it is the one loaded.
    return sorted(found, key=lambda ref: (ref.step, not ref.folder.startswith(SNAPSHOT_FOLDER)))


def read_manifest(storage: Storage, ref: CheckpointRef) -> Manifest:
    """The content of `ref`'s marker; DamagedCheckpoint (one line) when it is not a valid marker of that step."""
    rel = join(ref.folder, marker_name(ref.step))
    manifest = Manifest.from_bytes(storage.read_bytes(rel), storage.uri(rel))
    if manifest.step != ref.step:
        raise DamagedCheckpoint(f"the step marker {storage.uri(rel)} records step {manifest.step}: it was copied or "
                                "renamed from another checkpoint; load the checkpoint before it")
    return manifest


def latest_checkpoint(storage: Storage) -> CheckpointRef | None:
    complete = complete_checkpoints(storage)
    return complete[-1] if complete else None


def walk_files(storage: Storage, folder: str) -> list[str]:
    """Paths (relative to `folder`) of every file below `folder`, recursively."""
    files = []
    for name in storage.list(folder):
        path = join(folder, name)
        if storage.exists(path):
            files.append(name)
        else:
            files.extend(join(name, inner) for inner in walk_files(storage, path))
    return files
