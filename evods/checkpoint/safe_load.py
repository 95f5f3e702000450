"""Reading torch-pickled checkpoint files without letting them run code.

People download checkpoints, and `torch.load(weights_only=False)` runs whatever a file's pickle says (a
`__reduce__` can call any function). Every torch file evods reads goes through `load_file` / `load_bytes`: weights
only (tensors, numbers, strings and plain containers) plus the few types named below, each of which only rebuilds
data. A file that holds anything else is refused with the type it names.

DeepSpeed's own loads call `torch.load(weights_only=False)` themselves: evods' checkpoint engine (deepspeed_io.py)
routes `engine.load_checkpoint` through `load_file`, and `deepspeed_loads_weights_only` covers the direct calls of
its universal-checkpoint conversion.
"""
import io
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import DamagedCheckpoint

# numpy arrays (the RNG states in rng/rank{r}.pt and sampler.pt, also in InternEvo's sampler.pt): the array
# constructor, its dtype and the uint32 dtype class. They rebuild an array from bytes and call nothing else.
NUMPY_ARRAYS = (np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32)))


def deepspeed_objects() -> tuple:
    """The DeepSpeed types inside its ZeRO optimizer files (zero_pp_rank_*_optim_states.pt), as listed by
    torch.serialization.get_unsafe_globals_in_checkpoint: the loss scaler (attributes only), the ZeRO stage enum and
    the fragment_address dataclass. Imported late: deepspeed takes seconds to import."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_file(path: str, allowed: tuple = (), map_location="cpu") -> Any:
    """The content of the torch file at `path`, weights only; DamagedCheckpoint names the file and the problem."""
    try:
        with open(path, "rb") as f:
            return _load(f, path, allowed, map_location)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None


def load_bytes(data: bytes, name: str, allowed: tuple = ()) -> Any:
    return _load(io.BytesIO(data), name, allowed, "cpu")


def _load(f: BinaryIO, name: str, allowed: tuple, map_location) -> Any:
    try:
        with _allowing(allowed):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(f, allowed) or _GLOBAL.findall(str(exc))[:1] or ["a Python object"]
        raise DamagedCheckpoint(
            f"{name} holds {', '.join(found)}, which is not tensor data: evods reads checkpoints weights-only so that "
            "a file "
            "cannot run code on this machine; a checkpoint evods, DeepSpeed or InternEvo wrote never holds it, so "
            "this file was altered or comes from elsewhere: do not load it") from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedCheckpoint(f"{name} cannot be read ({reason}): the file is damaged or truncated") from None


@contextmanager
def _allowing(types: tuple):
    """torch's safe_globals, nestable: torch.serialization.safe_globals removes its types on exit even when an outer
    block had added them, which would break DeepSpeed's loads inside deepspeed_loads_weights_only."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(list(types))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _unsafe_globals(f: BinaryIO, allowed: tuple) -> list[str]:
    """The names of the functions and classes the file would call, besides the allowed ones (for the message)."""
    allowed_names = {f"{item.__module__}.{item.__qualname__}" for item in allowed}
    try:
        f.seek(0)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # noqa: BLE001 - only for the message; the load itself was already refused
        return []
    return [name for name in names if name not in allowed_names][:4]


@contextmanager
def deepspeed_loads_weights_only():
    """Within the block, every torch.load, including DeepSpeed's own `torch.load(weights_only=False)` calls, loads
    weights only with DeepSpeed's types allowed. TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's switch for exactly this
    (torch.serialization.load reads it on every call and it overrides an explicit weights_only=False)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _allowing((*deepspeed_objects(), *NUMPY_ARRAYS)):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
