"""Which checkpoint to load at start, and how to read its model weights: auto_resume, load_ckpt_info and the legacy
keys, resolved as InternEvo's CheckpointManager does."""
import json
import logging
import os
from dataclasses import dataclass, field, replace

import torch

from evods.config import CkptConfig
from evods.model import config_from_model_dict
from evods.storage import LocalStorage, Storage, open_storage

from .. import layout, safe_load
from ..collective import rank
from ..errors import CheckpointError
from ..formats.hf_start import HF_CKPT_TYPES, check_hf_folder, layout_differences
from ..formats.internevo import MODEL_CONFIG as NATIVE_MODEL_CONFIG
from ..formats.internevo import is_native_checkpoint, read_native_model
from ..formats.weights import deepspeed_weights

logger = logging.getLogger("evods.checkpoint")

ALL_CONTENT = frozenset({"model", "sampler", "optimizer", "scheduler"})
# InternEvo's native formats as (family of names, MLP naming) (formats/internevo_layout.py); None: read off the files.
# "internlm" for InternLM (and InternEvo before its 2024-02 MLP rename); "internevo" for InternEvo after it, whose
# files are of the run's model type (InternLM's names, InternLM2's grouped wqkv or InternLM3's split wq/wk/wv, told
# apart by their names); "internlm2_test" for InternLM2's (InternEvo's name of its loader that reshards them); "llama"
# for InternEvo's LLaMA-family names (revert_internlm.py, its LLaMA models), whose MLP naming the weight shapes show.
NATIVE_LAYOUTS = {"internlm": ("internlm", "v1"), "internevo": (None, "v2"), "internlm2_test": ("internlm2", "v2"),
                  "llama": ("llama", None)}
MODEL_ONLY_NATIVE = ("llama", "internlm2_test")  # InternEvo's LOAD_FUNC_DICT entries: model weights only
# The config fields that give the parameters their shapes: a checkpoint loads only into a model that agrees on all.
MODEL_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads")


@dataclass(frozen=True)
class LoadPlan:
    path: str  # storage path of the root (as in the config: local:/..., boto3:s3://..., or a plain path)
    folder: str  # the checkpoint folder relative to that root ("" when the path is the checkpoint itself)
    content: frozenset
    ckpt_type: str
    reason: str
    # auto_resume: the older complete checkpoints, newest first, to load instead if this one is damaged
    fallbacks: tuple["LoadPlan", ...] = field(default=(), compare=False)

    @property
    def loads_weights_only(self) -> bool:
        """Model weights go into the plain model before the engine is built unless DeepSpeed loads them with the
        optimizer state."""
        return "model" in self.content and "optimizer" not in self.content

    @property
    def is_native(self) -> bool:
        return self.ckpt_type in NATIVE_LAYOUTS

    @property
    def is_evods(self) -> bool:
        return self.ckpt_type == "evods"

    @property
    def is_hf(self) -> bool:
        """An HF folder (formats/hf_start.py), which each rank reads its own part of once the model is split."""
        return self.ckpt_type in HF_CKPT_TYPES

    def describe(self) -> str:
        return layout.join(self.path, self.folder) if self.folder else self.path

    def announce(self) -> None:
        logger.warning("=" * 100)
        logger.warning("LOADED CHECKPOINT %s (type %s, content %s)", self.describe(), self.ckpt_type,
                       ", ".join(sorted(self.content)))
        logger.warning("why: %s", self.reason)
        logger.warning("=" * 100)


def choose_load_plan(ckpt: CkptConfig, save_storage: Storage | None) -> LoadPlan | None:
    """The checkpoint to start from, or None for a new run."""
    if ckpt.auto_resume and save_storage is not None:
        complete = layout.complete_checkpoints(save_storage, report_incomplete=rank() == 0)
        if complete:
            ignored = f"; load_ckpt_info ({ckpt.load_ckpt_info.path}) is ignored, set auto_resume=False to use it" \
                if ckpt.load_ckpt_info else ""
            newest_first = list(reversed(complete))
            plans = [LoadPlan(ckpt.save_ckpt_folder, ref.folder, ALL_CONTENT, "evods",
                              f"auto_resume=True and the newest {'' if ref is newest_first[0] else 'intact '}complete "
                              f"checkpoint under {ckpt.save_ckpt_folder} is step {ref.step}{ignored}")
                     for ref in newest_first]
            return replace(plans[0], fallbacks=tuple(plans[1:]))
    return _configured_plan(ckpt)


def _configured_plan(ckpt: CkptConfig) -> LoadPlan | None:
    """load_ckpt_info, or the legacy keys."""
    if ckpt.load_ckpt_info is not None:
        info = ckpt.load_ckpt_info
        return _checked(LoadPlan(info.path, "", _expand(info.content), info.ckpt_type, "ckpt.load_ckpt_info"))
    legacy = _legacy_plan(ckpt)
    return _checked(legacy) if legacy else None


def choose_base_plan(ckpt: CkptConfig) -> LoadPlan | None:
    """Where a LoRA run's frozen base comes from when it resumes: the model-only checkpoint the config names (its
    own checkpoints hold the adapters only). None when the config names none (a base built from the seed)."""
    plan = _configured_plan(ckpt)
    return plan if plan is not None and plan.loads_weights_only else None


def _expand(content) -> frozenset:
    return ALL_CONTENT if "all" in content else frozenset(content)


def _legacy_plan(ckpt: CkptConfig) -> LoadPlan | None:
    """load_ckpt_folder / load_model_only_folder, InternEvo's keys before load_ckpt_info (neither loads schedulers)."""
    if ckpt.load_ckpt_folder:
        content = {"model", "sampler", "optimizer"} if ckpt.load_optimizer else {"model", "sampler"}
        return LoadPlan(ckpt.load_ckpt_folder, "", frozenset(content), "evods", "ckpt.load_ckpt_folder")
    if ckpt.load_model_only_folder:
        return LoadPlan(ckpt.load_model_only_folder, "", frozenset({"model"}), "evods", "ckpt.load_model_only_folder")
    return None


def _checked(plan: LoadPlan) -> LoadPlan:
    storage = open_storage(plan.path)
    missing = not os.path.exists(storage.root) if isinstance(storage, LocalStorage) else not storage.list("")
    if missing:
        raise CheckpointError(f"{plan.reason} path {plan.path} does not exist: give the folder of one checkpoint "
                              "(e.g. save_ckpt_folder/100)")
    is_evods = storage.exists(layout.TOPOLOGY)
    if plan.is_hf and plan.content != {"model"}:
        raise CheckpointError(f"an HF folder ({plan.path}) holds model weights only: set content=('model',) "
                              f"instead of {tuple(sorted(plan.content))}")
    if plan.ckpt_type in MODEL_ONLY_NATIVE and plan.content != {"model"}:
        raise CheckpointError(f"ckpt_type={plan.ckpt_type!r} loads model weights only, as InternEvo's loader of that "
                              f"name: set content=('model',) instead of {tuple(sorted(plan.content))} for {plan.path}")
    if "optimizer" in plan.content and "model" not in plan.content:
        raise CheckpointError(f"content {tuple(sorted(plan.content))} for {plan.path}: the optimizer state only loads "
                              "together with its model; add 'model'")
    if plan.is_native:
        _check_native(plan, is_native_checkpoint(storage.list("")), is_evods)
    if plan.is_hf:
        check_hf_folder(storage, plan.folder, plan.ckpt_type, f"{plan.reason} path {plan.path}")
    if plan.is_evods:
        if not is_evods:
            raise CheckpointError(f"{plan.path} is not an evods checkpoint folder (no {layout.TOPOLOGY}); for an HF "
                                  "folder set ckpt_type='hf'")
        if layout.marked_step(storage, "") is None:
            raise CheckpointError(f"{plan.path} has no {{step}}{layout.MARKER_SUFFIX} marker: its save did not "
                                  "finish, so it may be partial; load an earlier checkpoint")
    return plan


def _check_native(plan: LoadPlan, is_native: bool, is_evods: bool) -> None:
    if not is_native:
        hint = "it is an evods checkpoint: set ckpt_type='evods'" if is_evods else \
            "for an HF folder set ckpt_type='hf'"
        raise CheckpointError(f"{plan.path} holds no model_tp*_pp*.pt files, so it is not an InternEvo native "
                              f"checkpoint (ckpt_type={plan.ckpt_type!r}); {hint}")
    if "optimizer" in plan.content:
        raise CheckpointError(f"content {tuple(sorted(plan.content))} for the native checkpoint {plan.path}: "
                              "InternEvo's optimizer state (HybridZero partitions) does not load into DeepSpeed; use "
                              "content=('model', 'sampler', 'scheduler') to continue with a fresh Adam state")


def read_model_weights(plan: LoadPlan, local_folder: str) -> dict[str, torch.Tensor]:
    """HF-named model weights of the planned evods or native checkpoint, copied locally at `local_folder` (an HF
    folder is read rank by rank instead: formats/hf_start.py)."""
    if plan.is_native:
        family, mlp_naming = NATIVE_LAYOUTS[plan.ckpt_type]
        return read_native_model(local_folder, family, mlp_naming)[1]
    return deepspeed_weights(local_folder)


def saved_model_config(plan: LoadPlan) -> dict:
    """The planned checkpoint's model config (HF config.json fields), read without loading its weights."""
    storage = open_storage(plan.path)
    if plan.is_native:
        model_dict = safe_load.load_bytes(storage.read_bytes(layout.join(plan.folder, NATIVE_MODEL_CONFIG)),
                                          f"{plan.describe()}/{NATIVE_MODEL_CONFIG}")
        return config_from_model_dict(model_dict).to_dict()
    try:
        saved = json.loads(storage.read_bytes(layout.join(plan.folder, layout.MODEL_CONFIG)))
        # a multi-head model's config.json may not name its KV heads (InternLM's published v1 folders)
        return {"num_key_value_heads": saved.get("num_attention_heads"), **saved}
    except FileNotFoundError:
        raise CheckpointError(f"{plan.describe()} has no {layout.MODEL_CONFIG}, so its model cannot be checked "
                              "against this run's; give the folder of a complete checkpoint") from None


def check_same_model(plan: LoadPlan, model_config) -> None:
    """Refuse, in one line, a checkpoint of another model than the run's `model_config` (an HF config)."""
    saved = saved_model_config(plan)
    differences = [f"{name} {saved.get(name)} there, {getattr(model_config, name)} here"
                   for name in MODEL_SHAPE_FIELDS if saved.get(name) != getattr(model_config, name)]
    if plan.ckpt_type == "hf_llama":
        differences += layout_differences(saved, model_config)
    if differences:
        key = "save_ckpt_folder" if plan.reason.startswith("auto_resume") else plan.reason
        raise CheckpointError(f"{plan.describe()} holds another model than this run's config: "
                              f"{'; '.join(differences)}. Point {key} at a checkpoint of this model, or set the "
                              "config's model sizes to the checkpoint's")
