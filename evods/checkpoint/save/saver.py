"""Saving during training: when (policy.py), what (DeepSpeed's files, the run state, the configs; layout.py), and the
atomic completion of every save: the step marker is written last, once every rank's files are in the storage."""
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from evods.config import CkptConfig
from evods.parallel import ParallelLayout
from evods.storage import AsyncUploader, LocalStorage, Storage, explain_os_error, make_scratch_folder, open_storage

from .. import collective, layout
from ..errors import CheckpointError
from ..marker import FileDigest, Manifest
from ..rng import rng_state
from ..run_state import TrainingParts, to_bytes
from .policy import SavePolicy, StopFile
from .upload import Publisher

logger = logging.getLogger("evods.checkpoint")


@dataclass
class _PendingSave:
    """A save whose files are written (or uploading in the background) and whose marker is still due."""

    folder: str
    step: int
    files: dict[str, FileDigest] = field(default_factory=dict)  # this rank's files, relative to `folder`


class CheckpointSaver:
    def __init__(self, ckpt: CkptConfig, parallel: ParallelLayout, model_config, config_text: str | None,
                 upload_options: dict | None = None,
                 on_failure: Callable[[BaseException | str], None] | None = None,
                 adapter_config: dict | None = None):
        """`model_config`: the model's HF config (saved as config.json). `upload_options`: AsyncUploader keyword
        arguments (attempts, retry_backoff_s, workers). `on_failure` hears of this rank's failed saves (the error,
        which is raised as well) and failed background uploads (a description, as soon as one fails for good; the
        next save raises), e.g. to send an alert. `adapter_config`: a LoRA run's peft adapter config (written as
        adapter_config.json, which tells the exports that the checkpoint holds adapters)."""
        self.parallel = parallel
        self.on_failure = on_failure
        self.model_config = model_config
        self.config_text = config_text
        self.adapter_config = adapter_config
        self.keep_last = ckpt.keep_last_ckpts
        self.storage: Storage | None = None
        self._pending: _PendingSave | None = None
        self._last_saved_step: int | None = None
        if ckpt.save_ckpt_folder:
            self.storage = open_storage(ckpt.save_ckpt_folder)
            # every rank checks its own access; a failure is reported once, by the first rank that hit it
            collective.agree_on_failure(f"checking {ckpt.save_ckpt_folder}", self.storage.ping)
            uploader = collective.agree_on_failure(
                "preparing the async upload folder",
                lambda: AsyncUploader(self.storage, ckpt.async_upload_tmp_folder, **(upload_options or {}),
                                      on_failure=self._upload_failed)
                if ckpt.async_upload else None)
            self.publisher = Publisher(self.storage, uploader)
        # Without a save folder the intervals are inf, but the stop file still stops the run (+N).
        stop_file = collective.agree_on_failure("creating the stop file", lambda: StopFile(ckpt.stop_file_path))
        self.policy = SavePolicy(ckpt.checkpoint_every, ckpt.oss_snapshot_freq, stop_file)

    @property
    def saving(self) -> bool:
        return self.storage is not None

    @property
    def staging_root(self) -> str | None:
        """Where background uploads stage their files (None: the temp folder)."""
        return self.publisher.uploader.tmp_folder if self.saving and self.publisher.uploader else None

    def after_step(self, step_count: int, parts: TrainingParts) -> bool:
        """Save if the policy says so; True when the stop file asked to quit now."""
        decision = self.policy.decide(step_count)
        if decision.folder is not None:
            if self.saving:
                self.save(decision.folder, step_count, parts)
            else:
                logger.warning("the stop file asks for a checkpoint at step %d, but saving is off "
                               "(ckpt.enable_save_ckpt=False); nothing is saved", step_count)
        return decision.quit

    def save_on_stop(self, step_count: int, parts: TrainingParts) -> None:
        """A run stopped on request (SIGTERM from a scheduler's preemption) keeps its progress: a normal checkpoint
        of `step_count`, unless the policy has just written one."""
        if self.saving and self._last_saved_step != step_count:
            logger.warning("saving step %d… (a stop was requested; the job ends once it is saved)", step_count)
            self.save(str(step_count), step_count, parts)

    def save(self, folder: str, step: int, parts: TrainingParts) -> None:
        # evods' checkpoint engine, imported here: the converters, which import this package, need no DeepSpeed
        from ..deepspeed_io import install, trains_part_only

        self._complete_pending()
        self._last_saved_step = step
        rank = collective.rank()
        checkpoint_engine = install(parts.engine)

        def clear_folder():
            if rank == 0 and self.storage.list(folder):
                self.storage.delete_prefix(folder)  # an interrupted save at this step, or the snapshot slot's last one

        collective.agree_on_failure(f"clearing {self.storage.uri(folder)}", clear_folder, self.on_failure)
        local = isinstance(self.storage, LocalStorage)
        if local:  # DeepSpeed writes in place; the marker guards the folder
            target = os.path.join(self.storage.root, *folder.split("/"))
        else:  # each rank stages its own DeepSpeed files locally and sends exactly those
            target = collective.agree_on_failure("creating the local staging folder", lambda: _staging_folder(
                step, rank, self.staging_root))
        # A write error is kept by the checkpoint engine until DeepSpeed's barriers are behind every rank.
        parts.engine.save_checkpoint(target, tag=layout.DEEPSPEED_TAG, save_latest=False,
                                     exclude_frozen_parameters=trains_part_only(parts.engine))
        pending = _PendingSave(folder, step)

        def write_own_files():
            checkpoint_engine.raise_error()
            pending.files.update(checkpoint_engine.take_written(target))
            if not local:
                self.publisher.move_folder(target, folder, f"the checkpoint of step {step}")
            if rank == 0:
                pending.files.update(self._write_run_state(folder, parts))
            rng = layout.rng_file(rank)
            pending.files[rng] = self.publisher.write(layout.join(folder, rng), to_bytes(rng_state()))

        collective.agree_on_failure(f"writing the checkpoint of step {step}", write_own_files, self.on_failure)
        self._pending = pending
        if self.publisher.uploader is None:
            self._complete_pending()
        else:
            logger.info("checkpoint of step %d: uploading to %s in the background", step, self.storage.uri(folder))

    def _upload_failed(self, failed) -> None:
        if self.on_failure is not None:
            self.on_failure(f"background upload of {failed}")

    def _write_run_state(self, folder: str, parts: TrainingParts) -> dict[str, FileDigest]:
        topology = layout.topology_record(self.parallel, self.model_config.num_hidden_layers)
        files = {
            layout.CONTEXT: to_bytes(parts.context.state_dict()),
            layout.SAMPLER: to_bytes(parts.sampler.state_dict()),
            layout.SCHEDULERS: to_bytes({"lr": parts.lr_scheduler.state_dict(),
                                         "beta2": parts.beta2_scheduler.state_dict()}),
            layout.TOPOLOGY: json.dumps(topology).encode(),
            layout.MODEL_CONFIG: self.model_config.to_json_string().encode(),
        }
        if self.config_text is not None:
            files[layout.CONFIG_TEXT] = self.config_text.encode()
        if self.adapter_config is not None:
            files[layout.ADAPTER_CONFIG] = json.dumps(self.adapter_config, indent=2, sort_keys=True).encode()
        return {name: self.publisher.write(layout.join(folder, name), data) for name, data in files.items()}

    def _complete_pending(self) -> None:
        """Wait for the pending save's files on every rank, then write its marker (rank 0), then prune."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        where = self.storage.uri(pending.folder)

        def wait_for_uploads():
            try:
                self.publisher.wait(f"the checkpoint of step {pending.step}")
            except CheckpointError:
                raise
            except Exception as exc:  # AsyncUploadError and the storage's own errors
                raise CheckpointError(f"checkpoint of step {pending.step} at {where} is incomplete (no marker "
                                      f"written, it will not be loaded): {exc}") from exc

        collective.agree_on_failure(f"uploading the checkpoint of step {pending.step}", wait_for_uploads)
        files = {rel: digest for rank_files in collective.all_gather(pending.files)
                 for rel, digest in rank_files.items()}

        def write_marker():
            if collective.rank() == 0:
                self.storage.write_bytes(layout.join(pending.folder, layout.marker_name(pending.step)),
                                         Manifest(pending.step, files).to_bytes())
                logger.info("checkpoint of step %d is complete: %s", pending.step, where)
                self._prune()

        collective.agree_on_failure(f"completing the checkpoint of step {pending.step}", write_marker)

    def _prune(self) -> None:
        """Keep only the newest `keep_last_ckpts` normal checkpoints (snapshots are not counted)."""
        if not self.keep_last:
            return
        normal = [ref for ref in layout.complete_checkpoints(self.storage) if ref.folder.isdigit()]
        if len(normal) <= self.keep_last:
            return
        oldest_kept = normal[-self.keep_last].step
        for name in self.storage.list(""):
            if name.isdigit() and int(name) < oldest_kept:
                self.storage.delete_prefix(name)
                logger.info("removed old checkpoint %s (keep_last_ckpts=%d)", self.storage.uri(name), self.keep_last)

    def close(self) -> None:
        """At the end of training: finish the pending save (uploads, then marker) and stop the upload threads."""
        if not self.saving:
            return
        self._complete_pending()
        if self.publisher.uploader is not None:
            self.publisher.uploader.close()


def _staging_folder(step: int, rank: int, root: str | None) -> str:
    try:
        return make_scratch_folder(f"ckpt-{step}-rank{rank}", root)
    except OSError as exc:
        raise explain_os_error(exc, "create a staging folder in", root or tempfile.gettempdir()) from exc
