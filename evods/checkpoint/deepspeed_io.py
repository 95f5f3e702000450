"""DeepSpeed's checkpoint engine as evods runs it.

DeepSpeed writes and reads every file of `engine.save_checkpoint` / `engine.load_checkpoint` (the pipeline module's
layer files included) through `engine.checkpoint_engine`, a pluggable object; evods puts this one in its place:
- save: each file is digested while it is written (for the step marker, marker.py) and fsynced; a write error (a
  full disk, a read-only mount) is kept, not raised, so that this rank still goes through DeepSpeed's barriers with
  the others, and `raise_error` reports it once the save has returned;
- load: weights only (safe_load.py), where DeepSpeed's TorchCheckpointEngine.load calls torch.load(weights_only=False);
  an empty file (the placeholder of a file this node did not download) is refused with a clear error.
A model with frozen parameters (a LoRA run's base) saves its trained ones only (`trains_part_only`): the frozen
base is the model-only folder it was loaded from, which a resume loads again.
"""
import os

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from evods.storage import StorageError, explain_os_error

from . import safe_load
from .errors import CheckpointError
from .marker import DigestingWriter, FileDigest


class VerifyingCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, zipfile_serialization: bool = True):
        CheckpointEngine.__init__(self)  # TorchCheckpointEngine's own would log a serialization it then does not use
        self.name = "evods VerifyingCheckpointEngine"
        self.zipfile_serialization = zipfile_serialization
        self.written: dict[str, FileDigest] = {}  # absolute path -> digest, since the last take_written()
        self.error: StorageError | None = None

    def makedirs(self, path, exist_ok=False):
        if self.error is None:
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                self.error = explain_os_error(exc, "create", path)

    def save(self, state_dict, path: str):
        if self.error is not None:  # the checkpoint is lost already; skip the writes, keep the barriers
            return
        import torch

        try:
            with open(path, "wb") as f:
                writer = DigestingWriter(f)
                try:
                    torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
                except RuntimeError as exc:
                    if writer.error is None:
                        raise StorageError(f"cannot write {path}: {exc}") from exc
                    raise writer.error from exc
                f.flush()
                os.fsync(f.fileno())  # DeepSpeed's torch.save does not; the marker promises durable files
            self.written[os.path.abspath(path)] = writer.digest()
        except OSError as exc:
            self.error = explain_os_error(exc, "write", path)
        except StorageError as exc:
            self.error = exc

    def load(self, path: str, map_location=None):
        if os.path.getsize(path) == 0:  # a placeholder of a remote checkpoint's local copy (resume/download.py)
            raise CheckpointError(f"{path} is empty: it was not downloaded to this node, because evods fetches "
                                  "only the checkpoint files this node's ranks read and DeepSpeed asked for another "
                                  "(a gap in evods/checkpoint/resume/rank_files.py: please report it), or the file is "
                                  "empty in the checkpoint itself")
        return safe_load.load_file(path, safe_load.deepspeed_objects(), map_location=map_location)

    def take_written(self, folder: str) -> dict[str, FileDigest]:
        """{path relative to `folder`: digest} of the files written below `folder` since the last call."""
        folder = os.path.abspath(folder)
        taken = {os.path.relpath(path, folder).replace(os.sep, "/"): digest
                 for path, digest in self.written.items() if path.startswith(folder + os.sep)}
        self.written.clear()
        return taken

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


def install(engine) -> VerifyingCheckpointEngine:
    """Put evods' checkpoint engine into the DeepSpeed `engine` (once) and return it."""
    current = engine.checkpoint_engine
    if isinstance(current, VerifyingCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"the DeepSpeed config selects the checkpoint engine {type(current).__name__}; evods "
                              "saves through DeepSpeed's default torch engine (it adds checksums and weights-only "
                              "loading): remove the checkpoint engine settings from --ds_config")
    checkpoint_engine = engine.checkpoint_engine = VerifyingCheckpointEngine(current.zipfile_serialization)
    # The one file save_checkpoint writes itself: rank 0 copies zero_to_fp32.py beside the checkpoint. Its error (a
    # full disk) would leave rank 0 out of DeepSpeed's closing barrier, so it is kept like the engine's own.
    copy_recovery_script = engine._copy_recovery_script

    def copy_recovery_script_keeping_errors(save_path):
        if checkpoint_engine.error is None:
            try:
                copy_recovery_script(save_path)
            except OSError as exc:
                checkpoint_engine.error = explain_os_error(exc, "write", save_path)

    engine._copy_recovery_script = copy_recovery_script_keeping_errors
    return checkpoint_engine


def trains_part_only(engine) -> bool:
    """Whether some of the engine's parameters are frozen (LoRA's base): its checkpoints hold the trained ones only
    (DeepSpeed's exclude_frozen_parameters), and load without the others (load_module_strict=False)."""
    return any(not param.requires_grad for param in engine.module.parameters())
