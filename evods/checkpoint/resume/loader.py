"""Loading at start: which checkpoint (plan.py, chosen once on rank 0 for every rank), its model weights into the
plain model before the DeepSpeed engine exists, and the rest after it: each rank's files (rank_files.py) copied to
the node (download.py), checked against the step marker (verify.py), then loaded, at another data or pipeline size
through DeepSpeed's universal checkpoint (reshard.py). A damaged auto-resumed checkpoint falls back to the previous
complete one."""
import logging
import os
from dataclasses import replace

import torch

from evods.config import CkptConfig
from evods.parallel import ParallelLayout, TensorParallelSplit, stage_layers
from evods.parallel.nodes import NodeLayout
from evods.storage import Storage

from .. import collective, layout
from ..errors import CheckpointError, DamagedCheckpoint, FailedOnAnotherRank
from ..formats import internevo as native
from ..formats.hf_start import RankPart, load_rank_parts
from ..formats.weights import load_weights
from ..rng import set_rng_state
from ..run_state import TrainingParts, from_bytes
from .catalogue import Catalogue, read_catalogue_on_rank0
from .download import LocalCopy
from .plan import LoadPlan, check_same_model, choose_base_plan, choose_load_plan, read_model_weights
from .rank_files import deepspeed_files, model_files, own_deepspeed_files, run_state_files
from .reshard import check_reshardable, load_resharded, reshard_sampler_state
from .verify import verify_local

logger = logging.getLogger("evods.checkpoint")


class CheckpointLoader:
    def __init__(self, ckpt: CkptConfig, save_storage: Storage | None, parallel: ParallelLayout, model_config,
                 nodes: NodeLayout):
        """`save_storage`: the run's save folder, where auto_resume looks. `model_config`: the model's HF config,
        which the checkpoint's must match. `nodes`: which ranks share a node (and so a download)."""
        self.parallel = parallel
        self.model_config = model_config
        self.nodes = nodes
        self.fallback = ckpt.auto_resume_fallback
        self.ckpt = ckpt
        self.loaded: LoadPlan | None = None
        # Rank 0 lists the storage and reads the model config; the other ranks learn the answer.
        self.plan = collective.on_rank0("choosing the checkpoint to load", lambda: choose_load_plan(ckpt, save_storage))
        if self.plan is not None:  # before the engine is built, so that a wrong model fails in seconds
            collective.on_rank0("comparing the checkpoint's model",
                                lambda: check_same_model(self.plan, self.model_config))

    def load_model_weights(self, model: torch.nn.Module, frozen_base: bool = False) -> None:
        """Before the engine exists: copy the planned model weights into the plain model (HF names). A full resume
        (with the optimizer) loads the weights through DeepSpeed in `restore` instead; with `frozen_base` (LoRA: its
        checkpoints hold the adapters only) the base weights come from the config's model-only checkpoint then. An HF
        folder is read once the model is split instead (`load_split_model_weights`)."""
        plan = self._weights_plan(frozen_base)
        if plan is None or plan.is_hf:
            return
        catalogue = read_catalogue_on_rank0(plan)
        # every rank reads every model file (the tensor ranks are merged); the node downloads each once
        reads = [*model_files(catalogue.files), layout.TOPOLOGY] if plan.is_evods else sorted(catalogue.files)
        with LocalCopy(plan, catalogue, reads, self.nodes) as folder:
            def load():
                if plan.is_evods:
                    verify_local(folder, plan, catalogue)
                load_weights(model, read_model_weights(plan, folder), plan.describe())

            collective.agree_on_failure(f"loading the model of {plan.describe()}", load)
        self.loaded = plan
        plan.announce()

    def load_split_model_weights(self, model: torch.nn.Module, embed_split_hidden: bool,
                                 frozen_base: bool = False) -> None:
        """Before the engine exists, after tensor parallelism split `model` (with `embed_split_hidden`): copy this
        rank's part of the planned HF folder into it, each rank reading only the tensors of its pipeline stage and
        its slices of them (formats/hf_start.py). Other checkpoints were loaded whole by `load_model_weights`."""
        plan = self._weights_plan(frozen_base)
        if plan is None or not plan.is_hf:
            return
        part = self.rank_part(embed_split_hidden)
        catalogue = read_catalogue_on_rank0(plan)
        with LocalCopy(plan, catalogue, sorted(catalogue.files), self.nodes) as folder:
            collective.agree_on_failure(f"loading the model of {plan.describe()}",
                                        lambda: load_rank_parts(model, folder, part, plan.describe()))
        self.loaded = plan
        plan.announce()

    def starts_from_hf_folder(self, frozen_base: bool = False) -> bool:
        """Whether the model's weights come from an HF folder, each rank reading its part
        (`load_split_model_weights`)."""
        plan = self._weights_plan(frozen_base)
        return plan is not None and plan.is_hf

    def rank_part(self, embed_split_hidden: bool) -> RankPart:
        """What this rank holds of the model: its tensor slices and, under a pipeline, its stage's layers."""
        parallel, config = self.parallel, self.model_config
        num_layers = config.num_hidden_layers
        stage = stage_layers(num_layers, parallel.pp, parallel.pp_rank, config.tie_word_embeddings) \
            if parallel.pp > 1 else None
        return RankPart(TensorParallelSplit.of(config, parallel.tp, embed_split_hidden), parallel.tp_rank, num_layers,
                        stage)

    def _weights_plan(self, frozen_base: bool) -> LoadPlan | None:
        """The plan whose model weights go into the plain model before the engine exists, or None."""
        plan = self.plan
        if frozen_base and plan is not None and not plan.loads_weights_only:
            plan = collective.on_rank0("choosing the base model to load", lambda: choose_base_plan(self.ckpt))
        return plan if plan is not None and plan.loads_weights_only else None

    def restore(self, parts: TrainingParts) -> None:
        """After the engine exists: optimizer, schedulers, sampler, counters and RNG, as the plan's content says.

        An auto-resumed checkpoint that is damaged (files that do not match its marker, or that fail to load) is
        reported in one line and the previous complete checkpoint is loaded instead (ckpt.auto_resume_fallback).
        """
        # evods' checkpoint engine, imported here: the converters, which import this package, need no DeepSpeed
        from ..deepspeed_io import install

        plan = self.plan
        if plan is None or plan.content == {"model"}:
            return
        install(parts.engine)
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
        """The files of the planned checkpoint that this rank reads in `_restore` (rank_files.py)."""
        files = catalogue.files
        reads = run_state_files(files, collective.rank(), plan.content)
        if plan.is_native or "optimizer" not in plan.content:
            return reads
        if check_reshardable(catalogue.topology, self._topology(), plan.describe()):
            saved = catalogue.topology
            if self.model_config.tie_word_embeddings and max(saved["pp"], self.parallel.pp) > 1:
                # DeepSpeed's PipelineModule names the tied embedding by its tie key, which the universal checkpoint
                # conversion (reshard.py) does not map
                raise CheckpointError(f"{plan.describe()} holds a model with a tied output head saved at dp="
                                      f"{saved['dp']}, pp={saved['pp']}, and this run has dp={self.parallel.dp}, pp="
                                      f"{self.parallel.pp}: evods resumes a tied pipeline's optimizer at the layout "
                                      "that saved it; run with that layout, or load content=('model',) with a fresh "
                                      "optimizer")
            # converted once per node, by its leader (reshard.py), from the whole DeepSpeed folder
            return reads + (deepspeed_files(files) if self.nodes.is_leader else [])
        return reads + own_deepspeed_files(files, self.parallel, _stage_layers(engine))

    def _topology(self) -> dict:
        return layout.topology_record(self.parallel, self.model_config.num_hidden_layers)

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
        from ..deepspeed_io import trains_part_only

        now = self._topology()
        part_only = trains_part_only(parts.engine)
        if "optimizer" in plan.content:
            reshard = check_reshardable(saved, now, plan.describe())
            if reshard and part_only:
                raise CheckpointError(f"{plan.describe()} holds LoRA adapters saved at dp={saved['dp']}, pp="
                                      f"{saved['pp']} and this run has dp={now['dp']}, pp={now['pp']}: evods resumes "
                                      "adapters at the layout that saved them; run with that layout")
            if reshard:
                load_resharded(parts.engine, folder, plan.describe(), saved, now, self.nodes)
            else:
                path, _ = parts.engine.load_checkpoint(folder, tag=layout.DEEPSPEED_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False,
                                                       load_module_strict=not part_only)
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
            if sampler["data_world_size"] != self.parallel.dp:  # the rows' data ranks (isp ranks share rows)
                sampler = reshard_sampler_state(sampler, self.parallel.dp, plan.describe())
            parts.sampler.load_state_dict(sampler)
        rng_path = os.path.join(folder, layout.rng_file(collective.rank()))
        if os.path.isfile(rng_path):
            set_rng_state(_read(folder, layout.rng_file(collective.rank())))

    @staticmethod
    def _restore_native_run_state(folder: str, plan: LoadPlan, parts: TrainingParts) -> None:
        """InternEvo's context.pt, then its scheduler (from the step count) and sampler, as requested, like
        InternEvo's CheckpointManager.load_ckpt_info."""
        context = native.evods_context(folder)
        parts.context.load_state_dict(context)
        if "scheduler" in plan.content:
            schedulers = native.evods_schedulers(context["step_count"])
            parts.lr_scheduler.load_state_dict(schedulers["lr"])
            parts.beta2_scheduler.load_state_dict(schedulers["beta2"])
        if "sampler" in plan.content:
            parts.sampler.load_state_dict(native.evods_sampler(folder))


def _stage_layers(engine) -> range | None:
    """The PipelineModule layer indices of this rank's stage (DeepSpeed's partition), None without a pipeline."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    return range(module._local_start, module._local_stop) if isinstance(module, PipelineModule) else None


def _read(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is not an evods checkpoint or lacks this content")
    with open(path, "rb") as f:
        return from_bytes(f.read(), path)


def _raise_on_rank0(error: CheckpointError, cause: Exception) -> None:
    """Raise an error every rank reached alike so that the job prints it once (rank 0's)."""
    if collective.rank() == 0:
        raise error from cause
    raise FailedOnAnotherRank("loading the checkpoint", str(error)) from cause
