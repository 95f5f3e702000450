"""The model of a checkpoint folder, whatever its format: its InternLM config and its full HF-named weights."""
import json
import os
import shutil
import tempfile

import torch

from evods.model import InternLMConfig, config_from_model_dict
from evods.model.lora import merge_lora, spec_of_adapter_config
from evods.storage import LocalStorage, open_storage

from .. import layout
from ..errors import CheckpointError, DamagedCheckpoint
from ..resume.download import fetch_folder
from ..resume.verify import problems_in
from .internevo import is_native_checkpoint, read_native_model
from .weights import deepspeed_weights, hf_weights


def is_training_checkpoint(names: list[str]) -> bool:
    """Whether a folder with these file names is a training checkpoint (evods' or InternEvo's native one), which
    holds a config.json but no Hugging Face weights or tokenizer."""
    return (layout.TOPOLOGY in names or any(name.endswith(layout.MARKER_SUFFIX) for name in names)
            or is_native_checkpoint(names))


def read_checkpoint_model(src: str, mlp_naming: str | None = None,
                          base: str | None = None) -> tuple[InternLMConfig, dict[str, torch.Tensor]]:
    """`src`: a storage path of one evods checkpoint (with its marker) or InternEvo native checkpoint folder (either
    family of names). `mlp_naming` applies to native checkpoints (see internevo.read_native_model). A LoRA run's
    checkpoint holds its adapters only: its model is `base` (the model-only checkpoint or HF folder it trained on)
    with the adapters merged in."""
    config, weights, adapter_config = _read_checkpoint(src, mlp_naming)
    if adapter_config is None:
        return config, weights
    base_weights = read_base_weights(src, base)
    return config, merge_lora({**base_weights, **weights}, spec_of_adapter_config(adapter_config))


def read_lora_checkpoint(src: str, base: str | None) -> tuple[InternLMConfig, dict, dict, dict]:
    """A LoRA run's checkpoint `src` as (model config, `base`'s weights, the full adapters, peft's adapter config)."""
    config, adapters, adapter_config = _read_checkpoint(src, None)
    if adapter_config is None:
        raise CheckpointError(f"{src} holds a whole model, not LoRA adapters (it has no {layout.ADAPTER_CONFIG}); "
                              "export it without --adapter")
    return config, read_base_weights(src, base), adapters, adapter_config


def read_base_weights(src: str, base: str | None) -> dict[str, torch.Tensor]:
    """The weights of the base model of LoRA checkpoint `src`: an HF folder (local) or a checkpoint folder."""
    if base is None:
        raise CheckpointError(f"{src} holds LoRA adapters only: give --base, the model-only folder the run trained on "
                              "(its ckpt.load_ckpt_info path: an HF folder or a checkpoint)")
    if os.path.isdir(base) and not is_training_checkpoint(os.listdir(base)):
        return hf_weights(base)
    return read_checkpoint_model(base)[1]


def _read_checkpoint(src: str, mlp_naming: str | None) -> tuple[InternLMConfig, dict[str, torch.Tensor], dict | None]:
    storage = open_storage(src)
    names = storage.list("")
    native = is_native_checkpoint(names)
    if not native and layout.marked_step(storage, "") is None:
        raise CheckpointError(f"{src} has no {{step}}{layout.MARKER_SUFFIX} marker and no model_tp*_pp*.pt files: it "
                              "is not a complete evods checkpoint nor an InternEvo native one (give a folder such as "
                              "save_ckpt_folder/100)")
    temp = None if isinstance(storage, LocalStorage) else tempfile.mkdtemp(prefix="evods-convert-")
    try:
        folder = fetch_folder(storage, "", temp or "")
        if native:
            model_dict, weights = read_native_model(folder, mlp_naming=mlp_naming)
            return config_from_model_dict(model_dict), weights, None
        manifest = layout.read_manifest(storage, layout.CheckpointRef(layout.marked_step(storage, ""), ""))
        problems = problems_in(manifest, folder, sorted(manifest.files))
        if problems:
            raise DamagedCheckpoint(f"{src} is damaged: {problems[0]}")
        with open(os.path.join(folder, layout.MODEL_CONFIG)) as f:
            config = InternLMConfig.from_dict(json.load(f))
        adapter_config = None
        if os.path.exists(os.path.join(folder, layout.ADAPTER_CONFIG)):
            with open(os.path.join(folder, layout.ADAPTER_CONFIG)) as f:
                adapter_config = json.load(f)
        return config, deepspeed_weights(folder), adapter_config
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
