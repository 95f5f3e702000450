"""When to save (InternEvo's try_save_checkpoint): every `checkpoint_every` steps, snapshots every
`oss_snapshot_freq` steps, and on request through the stop file."""
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evods.storage import explain_os_error

from ..collective import rank
from ..layout import SNAPSHOT_FOLDER, join

logger = logging.getLogger("evods.checkpoint")


@dataclass(frozen=True)
class SaveDecision:
    folder: str | None  # where to save, relative to the save folder's root; None: no save at this step
    quit: bool = False  # the stop file asked to stop training after this save


class StopFile:
    """InternEvo's stop file: rank 0 writes "0" at start and reads an int each step, which every rank then agrees on.

    -N: save a normal checkpoint at step N. +N: save it and quit at step N. 0 (or unreadable text): nothing.
    """

    def __init__(self, path: str | None):
        self.path = path
        if path and rank() == 0:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write("0")
            except OSError as exc:
                raise explain_os_error(exc, "write the stop file (ckpt.stop_file_path)", path) from exc

    def read(self) -> int:
        value = torch.tensor([self._read_on_rank0()], dtype=torch.long)
        if dist.is_initialized():
            dist.broadcast(value, src=0)
        return int(value.item())

    def _read_on_rank0(self) -> int:
        if not self.path or rank() != 0:
            return 0
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError) as exc:
            logger.warning("stop file %s is unreadable (%s); ignoring it this step", self.path, exc)
            return 0


class SavePolicy:
    def __init__(self, checkpoint_every: float, snapshot_freq: float, stop_file: StopFile):
        self.checkpoint_every = checkpoint_every
        self.snapshot_freq = snapshot_freq
        self.stop_file = stop_file
        self._snapshot_slot = 0  # not persisted, as InternEvo: the first snapshot of every run goes to slot 1

    def decide(self, step_count: int) -> SaveDecision:
        """What to do after the optimizer step that made `step_count`; call it once per successful step."""
        request = self.stop_file.read()
        requested_here = request != 0 and abs(request) == step_count
        if requested_here:
            logger.warning("stop file %s: training will %s at step_count %d", self.stop_file.path,
                           "Stop" if request > 0 else "Save", step_count)
        if requested_here or _every(step_count, self.checkpoint_every):
            return SaveDecision(folder=str(step_count), quit=requested_here and request > 0)
        if self.snapshot_freq > 1 and _every(step_count, self.snapshot_freq):
            self._snapshot_slot = (self._snapshot_slot + 1) % 2
            return SaveDecision(folder=join(SNAPSHOT_FOLDER, str(self._snapshot_slot)))
        return SaveDecision(folder=None)


def _every(step_count: int, interval: float) -> bool:
    return not math.isinf(interval) and step_count % int(interval) == 0
