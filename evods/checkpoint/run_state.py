"""The state of a run that a checkpoint keeps besides the model: the parts that have one, and how their state dicts
are stored (torch files of plain data and numpy RNG states, read weights-only)."""
import io
from dataclasses import dataclass
from typing import Any

import torch

from . import safe_load


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores besides the model config; each part has state_dict/load_state_dict."""

    engine: Any  # the DeepSpeed engine: model and ZeRO-1 optimizer through save_checkpoint / load_checkpoint
    context: Any  # the loop's counters (step_count, batch_count, consumed tokens, skips)
    sampler: Any
    lr_scheduler: Any
    beta2_scheduler: Any


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, name: str):
    """A run-state file written by to_bytes: plain containers, tensors and the numpy arrays of RNG states, read
    weights-only (safe_load.py)."""
    return safe_load.load_bytes(data, name, safe_load.NUMPY_ARRAYS)
