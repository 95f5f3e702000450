"""The model of a checkpoint folder, whatever its format: its InternLM config and its full HF-named weights."""
import json
import os
import shutil
import tempfile

import torch

from evods.model import InternLMConfig, config_from_model_dict
from evods.storage import LocalStorage, open_storage

from .. import layout
from ..errors import CheckpointError, DamagedCheckpoint
from ..resume.download import fetch_folder
from ..resume.verify import problems_in
from .internevo import is_native_checkpoint, read_native_model
from .weights import deepspeed_weights


def is_training_checkpoint(names: list[str]) -> bool:
    """Whether a folder with these file names is a training checkpoint (evods' or InternEvo's native one), which
    holds a config.json but no Hugging Face weights or tokenizer."""
    return (layout.TOPOLOGY in names or any(name.endswith(layout.MARKER_SUFFIX) for name in names)
            or is_native_checkpoint(names))


def read_checkpoint_model(src: str, mlp_naming: str | None = None) -> tuple[InternLMConfig, dict[str, torch.Tensor]]:
    """`src`: a storage path of one evods checkpoint (with its marker) or InternEvo native checkpoint folder (either
    family of names). `mlp_naming` applies to native checkpoints (see internevo.read_native_model)."""
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
            return config_from_model_dict(model_dict), weights
        manifest = layout.read_manifest(storage, layout.CheckpointRef(layout.marked_step(storage, ""), ""))
        problems = problems_in(manifest, folder, sorted(manifest.files))
        if problems:
            raise DamagedCheckpoint(f"{src} is damaged: {problems[0]}")
        with open(os.path.join(folder, layout.MODEL_CONFIG)) as f:
            return InternLMConfig.from_dict(json.load(f)), deepspeed_weights(folder)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
