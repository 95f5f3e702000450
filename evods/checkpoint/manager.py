"""The checkpoint manager the training loop talks to: what to load at start, when and what to save, and the atomic
completion of every save (see layout.py for the folder contents)."""
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from evods.config import CkptConfig
from evods.parallel import ParallelSizes
from evods.parallel.nodes import NodeLayout, discover_nodes
from evods.storage import (
    AsyncUploader,
    LocalStorage,
    Storage,
    clean_scratch_leftovers,
    explain_os_error,
    make_scratch_folder,
    open_storage,
)

from . import collective, layout
from .errors import CheckpointError, DamagedCheckpoint, FailedOnAnotherRank
from .formats import internevo as native
from .formats.weights import load_weights
from .integrity import FileDigest, Manifest
from .local_copy import Catalogue, LocalCopy, is_evods, read_catalogue_on_rank0, verify_local
from .policy import SavePolicy, StopFile
from .reshard import check_reshardable, load_resharded, reshard_sampler_state
from .rng import rng_state, set_rng_state
from .selection import Reader, deepspeed_files, model_files, own_deepspeed_files, run_state_files
from .sources import LoadPlan, check_same_model, choose_load_plan, read_model_weights
from .transfer import Publisher, from_bytes, to_bytes

logger = logging.getLogger("evods.checkpoint")


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores besides the model config; each part has state_dict/load_state_dict."""

    engine: Any  # the DeepSpeed engine: model and ZeRO-1 optimizer through save_checkpoint / load_checkpoint
    context: Any  # the loop's counters (step_count, batch_count, consumed tokens, skips)
    sampler: Any
    lr_scheduler: Any
    beta2_scheduler: Any


@dataclass
class _PendingSave:
    """A save whose files are written (or uploading in the background) and whose marker is still due."""

    folder: str
    step: int
    files: dict[str, FileDigest] = field(default_factory=dict)  # this rank's files, relative to `folder`


class CheckpointManager:
    def __init__(self, ckpt: CkptConfig, sizes: ParallelSizes, model_config, config_text: str | None,
                 upload_options: dict | None = None,
                 on_failure: Callable[[BaseException | str], None] | None = None, nodes: NodeLayout | None = None):
        """`model_config`: the model's HF config (saved as config.json). `upload_options`: AsyncUploader keyword
        arguments (attempts, retry_backoff_s, workers). `on_failure` hears of this rank's failed saves (the error,
        which is raised as well) and failed background uploads (a description, as soon as one fails for good; the
        next save raises), e.g. to send an alert. `nodes`: which ranks share a node (discovered if not given)."""
        self.sizes = sizes
        self.on_failure = on_failure
        self.nodes = nodes or discover_nodes()
        self.model_config = model_config
        self.config_text = config_text
        self.keep_last = ckpt.keep_last_ckpts
        self.fallback = ckpt.auto_resume_fallback
        self.storage: Storage | None = None
        self._pending: _PendingSave | None = None
        self._last_saved_step: int | None = None
        self.loaded: LoadPlan | None = None
        if ckpt.save_ckpt_folder:
            self.storage = open_storage(ckpt.save_ckpt_folder)
            expected_snapshots = f"{ckpt.save_ckpt_folder.rstrip('/')}/{layout.SNAPSHOT_FOLDER}"
            if ckpt.snapshot_ckpt_folder not in (None, expected_snapshots):
                raise CheckpointError(f"ckpt.snapshot_ckpt_folder={ckpt.snapshot_ckpt_folder!r}: evods keeps snapshots"
                                      f" in {expected_snapshots} so that auto_resume finds them; remove the key")
            # every rank checks its own access; a failure is reported once, by the first rank that hit it
            collective.agree_on_failure(f"checking {ckpt.save_ckpt_folder}", self.storage.ping)
            uploader = collective.agree_on_failure(
                "preparing the async upload folder",
                lambda: AsyncUploader(self.storage, ckpt.async_upload_tmp_folder, **(upload_options or {}),
                                      on_failure=self._upload_failed)
                if ckpt.async_upload else None)
            self.publisher = Publisher(self.storage, uploader)
        _clean_leftovers(self.nodes, self._staging_root() if self.saving else None)
        # Without a save folder the intervals are inf, but the stop file still stops the run (+N).
        stop_file = collective.agree_on_failure("creating the stop file", lambda: StopFile(ckpt.stop_file_path))
        self.policy = SavePolicy(ckpt.checkpoint_every, ckpt.oss_snapshot_freq, stop_file)
        # Rank 0 lists the storage and reads the model config; the other ranks learn the answer.
        self.plan = collective.on_rank0("choosing the checkpoint to load", lambda: choose_load_plan(ckpt, self.storage))
        if self.plan is not None:  # before the engine is built, so that a wrong model fails in seconds
            collective.on_rank0("comparing the checkpoint's model",
                                lambda: check_same_model(self.plan, self.model_config))

    # ------------------------------------------------------------------------------------------------ loading

    def load_model_weights(self, model: torch.nn.Module) -> None:
        """Before the engine exists: copy the planned model weights into the plain model (HF names). A full resume
        (with the optimizer) loads the weights through DeepSpeed in `restore` instead."""
        if self.plan is None or not self.plan.loads_weights_only:
            return
        plan = self.plan
        catalogue = read_catalogue_on_rank0(plan)
        # every rank reads every model file (the tensor ranks are merged); the node downloads each once
        reads = [*model_files(catalogue.files), layout.TOPOLOGY] if is_evods(plan) else sorted(catalogue.files)
        with LocalCopy(plan, catalogue, reads, self.nodes) as folder:
            def load():
                if is_evods(plan):
                    verify_local(folder, plan, catalogue)
                load_weights(model, read_model_weights(plan, folder), plan.describe())

            collective.agree_on_failure(f"loading the model of {plan.describe()}", load)
        plan.announce()

    def restore(self, parts: TrainingParts) -> None:
        """After the engine exists: optimizer, schedulers, sampler, counters and RNG, as the plan's content says.

        An auto-resumed checkpoint that is damaged (files that do not match its marker, or that fail to load) is
        reported in one line and the previous complete checkpoint is loaded instead (ckpt.auto_resume_fallback).
        """
        plan = self.plan
        if plan is None or plan.content == {"model"}:
            return
        _checkpoint_engine(parts.engine)
        while True:
            try:
                self._restore(plan, parts)
                break
            except Exception as exc:  # noqa: BLE001 - every rank gets here together (agree_on_failure)
                plan = self._fallback_after(plan, exc)
        self.loaded = plan
        plan.announce()

    def _restore(self, plan: LoadPlan, parts: TrainingParts) -> None:
        """Download what this node reads (if remote), check the files against the marker, then load: each stage
        agreed by every rank, so a damaged file is reported as such before any rank tries to load it."""
        catalogue = read_catalogue_on_rank0(plan)
        reads = collective.agree_on_failure(f"choosing the files of {plan.describe()} to read",
                                            lambda: self._restore_reads(plan, catalogue, parts.engine))
        with LocalCopy(plan, catalogue, reads, self.nodes) as folder:
            if plan.is_native:
                load = lambda: self._restore_native_run_state(folder, plan, parts)  # noqa: E731
            else:
                collective.agree_on_failure(f"checking {plan.describe()}",
                                            lambda: verify_local(folder, plan, catalogue))
                load = lambda: self._restore_evods(folder, plan, catalogue.topology, parts)  # noqa: E731
            collective.agree_on_failure(f"loading {plan.describe()}", load)

    def _restore_reads(self, plan: LoadPlan, catalogue: Catalogue, engine) -> list[str]:
        """The files of the planned checkpoint that this rank reads in `_restore` (selection.py)."""
        files = catalogue.files
        reads = run_state_files(files, collective.rank(), plan.content)
        if plan.is_native or "optimizer" not in plan.content:
            return reads
        if check_reshardable(catalogue.topology, self._topology(), plan.describe()):
            # converted once per node, by its leader (reshard.py), from the whole DeepSpeed folder
            return reads + (deepspeed_files(files) if self.nodes.is_leader else [])
        return reads + own_deepspeed_files(files, Reader(collective.rank(), self.sizes, _stage_layers(engine)))

    def _topology(self) -> dict:
        return {"dp": self.sizes.dp, "pp": self.sizes.pp, "tp": self.sizes.tp, "zero_stage": self.sizes.zero_stage}

    def _fallback_after(self, plan: LoadPlan, exc: Exception) -> LoadPlan:
        """The plan to try after `plan` failed to load with `exc` (on every rank alike), or raise: once per job."""
        if not plan.reason.startswith("auto_resume"):
            raise exc
        reason = getattr(exc, "reason", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if not plan.fallbacks:
            _raise_on_rank0(CheckpointError(
                f"checkpoint {plan.describe()} is damaged ({reason}) and there is no earlier complete checkpoint to "
                "load instead; move the damaged folder away to start afresh"), exc)
        previous = plan.fallbacks[0]
        if not self.fallback:
            _raise_on_rank0(CheckpointError(
                f"checkpoint {plan.describe()} is damaged ({reason}); ckpt.auto_resume_fallback=False, so evods stops "
                f"here: set it True to load the previous complete checkpoint {previous.describe()}, or move the "
                "damaged folder away"), exc)
        if collective.rank() == 0:
            logger.warning("checkpoint %s is damaged (%s): loading the previous complete checkpoint %s instead",
                           plan.describe(), reason, previous.describe())
        collective.on_rank0("comparing the checkpoint's model", lambda: check_same_model(previous, self.model_config))
        return replace(previous, reason=f"{previous.reason}; {plan.describe()} is damaged ({reason})",
                       fallbacks=plan.fallbacks[1:])

    def _restore_evods(self, folder: str, plan: LoadPlan, saved: dict, parts: TrainingParts) -> None:
        now = self._topology()
        if "optimizer" in plan.content:
            if check_reshardable(saved, now, plan.describe()):
                load_resharded(parts.engine, folder, plan.describe(), saved, now, self.nodes)
            else:
                path, _ = parts.engine.load_checkpoint(folder, tag=layout.DEEPSPEED_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
                if path is None:
                    raise DamagedCheckpoint(f"DeepSpeed found no checkpoint in {plan.describe()}/"
                                            f"{layout.DEEPSPEED_TAG}")
        parts.context.load_state_dict(_read(folder, layout.CONTEXT))
        if "scheduler" in plan.content:
            schedulers = _read(folder, layout.SCHEDULERS)
            parts.lr_scheduler.load_state_dict(schedulers["lr"])
            parts.beta2_scheduler.load_state_dict(schedulers["beta2"])
        if "sampler" in plan.content:
            sampler = _read(folder, layout.SAMPLER)
            if saved["dp"] != now["dp"]:
                sampler = reshard_sampler_state(sampler, now["dp"], plan.describe())
            parts.sampler.load_state_dict(sampler)
        rng_path = os.path.join(folder, layout.rng_file(collective.rank()))
        if os.path.isfile(rng_path):
            set_rng_state(_read(folder, layout.rng_file(collective.rank())))

    @staticmethod
    def _restore_native_run_state(folder: str, plan: LoadPlan, parts: TrainingParts) -> None:
        """InternEvo's context.pt, then its scheduler (from the step count) and sampler, as requested, like
        CheckpointManager's load_ckpt_info."""
        context = native.evods_context(folder)
        parts.context.load_state_dict(context)
        if "scheduler" in plan.content:
            schedulers = native.evods_schedulers(context["step_count"])
            parts.lr_scheduler.load_state_dict(schedulers["lr"])
            parts.beta2_scheduler.load_state_dict(schedulers["beta2"])
        if "sampler" in plan.content:
            parts.sampler.load_state_dict(native.evods_sampler(folder))

    # ------------------------------------------------------------------------------------------------ saving

    @property
    def saving(self) -> bool:
        return self.storage is not None

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
            logger.warning("saving a checkpoint of step %d before stopping", step_count)
            self.save(str(step_count), step_count, parts)

    def save(self, folder: str, step: int, parts: TrainingParts) -> None:
        self._complete_pending()
        self._last_saved_step = step
        rank = collective.rank()
        checkpoint_engine = _checkpoint_engine(parts.engine)

        def clear_folder():
            if rank == 0 and self.storage.list(folder):
                self.storage.delete_prefix(folder)  # an interrupted save at this step, or the snapshot slot's last one

        collective.agree_on_failure(f"clearing {self.storage.uri(folder)}", clear_folder, self.on_failure)
        local = isinstance(self.storage, LocalStorage)
        if local:  # DeepSpeed writes in place; the marker guards the folder
            target = os.path.join(self.storage.root, *folder.split("/"))
        else:  # each rank stages its own DeepSpeed files locally and sends exactly those
            target = collective.agree_on_failure("creating the local staging folder", lambda: _staging_folder(
                step, rank, self._staging_root()))
        # A write error is kept by the checkpoint engine until DeepSpeed's barriers are behind every rank.
        parts.engine.save_checkpoint(target, tag=layout.DEEPSPEED_TAG, save_latest=False)
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

    def _staging_root(self) -> str | None:
        return self.publisher.uploader.tmp_folder if self.publisher.uploader else None

    def _write_run_state(self, folder: str, parts: TrainingParts) -> dict[str, FileDigest]:
        files = {
            layout.CONTEXT: to_bytes(parts.context.state_dict()),
            layout.SAMPLER: to_bytes(parts.sampler.state_dict()),
            layout.SCHEDULERS: to_bytes({"lr": parts.lr_scheduler.state_dict(),
                                         "beta2": parts.beta2_scheduler.state_dict()}),
            layout.TOPOLOGY: json.dumps({**self._topology(),
                                         "num_layers": self.model_config.num_hidden_layers}).encode(),
            layout.MODEL_CONFIG: self.model_config.to_json_string().encode(),
        }
        if self.config_text is not None:
            files[layout.CONFIG_TEXT] = self.config_text.encode()
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


def _stage_layers(engine) -> range | None:
    """The PipelineModule layer indices of this rank's stage (DeepSpeed's partition), None without a pipeline."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    return range(module._local_start, module._local_stop) if isinstance(module, PipelineModule) else None


def _clean_leftovers(nodes: NodeLayout, staging_root: str | None) -> None:
    """Delete the scratch folders (checkpoint staging, downloads, reshard caches) that crashed runs left on this
    node's disk: the node's leader does it before anything of this run is written there."""
    if not nodes.is_leader:
        return
    for root in dict.fromkeys((tempfile.gettempdir(), staging_root or tempfile.gettempdir())):
        removed = clean_scratch_leftovers(root)
        if removed:
            logger.warning("removed %d folders that crashed runs left in %s (e.g. %s)", len(removed), root,
                           os.path.basename(removed[0]))


def _read(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is not an evods checkpoint or lacks this content")
    with open(path, "rb") as f:
        return from_bytes(f.read(), path)


def _checkpoint_engine(engine):
    """evods' checkpoint engine in the DeepSpeed `engine` (deepspeed_io.py); imported here, not at the top, so that
    the converters, which import this package, do not pay for importing DeepSpeed."""
    from . import deepspeed_io

    return deepspeed_io.install(engine)


def _raise_on_rank0(error: CheckpointError, cause: Exception) -> None:
    """Raise an error every rank reached alike so that the job prints it once (rank 0's)."""
    if collective.rank() == 0:
        raise error from cause
    raise FailedOnAnotherRank("loading the checkpoint", str(error)) from cause


def _staging_folder(step: int, rank: int, root: str | None) -> str:
    try:
        return make_scratch_folder(f"ckpt-{step}-rank{rank}", root)
    except OSError as exc:
        raise explain_os_error(exc, "create a staging folder in", root or tempfile.gettempdir()) from exc
