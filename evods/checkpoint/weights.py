"""Model weights with Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...), read from any source.

evods' model is the HF InternLM model, and HF InternLM and HF Llama use the same parameter names, so an HF folder of
either layout gives evods' names directly. DeepSpeed's files are consolidated here: with pipeline size 1 the module
state in `mp_rank_00_model_states.pt` holds every weight (ZeRO-1 does not partition parameters); with a pipeline,
each `layer_XX-model_00-model_states.pt` holds one PipelineModule layer, named back through `pipeline_parameter_name`.
"""
import glob
import os
import re

import torch
from safetensors.torch import load_file

from evods.model import pipeline_parameter_name

from .layout import DEEPSPEED_TAG

# Buffers some HF InternLM checkpoints carry (InternLM's convert2hf.py) that evods recomputes.
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


class WeightsError(ValueError):
    """Model weights that cannot be read or do not fit the model; the message says which file or key and what to do."""


def deepspeed_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """HF-named weights of an evods checkpoint folder (local), consolidated from DeepSpeed's model files."""
    tag_dir = os.path.join(checkpoint_dir, DEEPSPEED_TAG)
    layer_files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")))
    if layer_files:
        return _pipeline_weights(layer_files)
    module_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(module_file):
        raise WeightsError(f"{checkpoint_dir} has no DeepSpeed model files ({module_file} or layer_*-model_states.pt); "
                           "is it an evods checkpoint? An HF folder needs ckpt_type='hf'")
    return dict(torch.load(module_file, map_location="cpu", weights_only=False)["module"])


def _pipeline_weights(layer_files: list[str]) -> dict[str, torch.Tensor]:
    layers = {}
    for path in layer_files:
        index, tensor_rank = map(int, _LAYER_FILE.search(path).groups())
        if tensor_rank != 0:
            raise WeightsError(f"{path} is a tensor-parallel shard; merging tensor-parallel DeepSpeed checkpoints is "
                               "not supported yet: convert it with a run of the same tensor size")
        layers[index] = path
    num_layers = len(layers) - 2  # embedding and head around the decoder layers
    weights = {}
    for index, path in sorted(layers.items()):
        for local_name, tensor in torch.load(path, map_location="cpu", weights_only=False).items():
            weights[pipeline_parameter_name(index, local_name, num_layers)] = tensor
    return weights


def hf_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights of an HF model folder (safetensors, sharded or not, or pytorch_model*.bin)."""
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if shards:
        weights = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    else:
        bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not bins:
            raise WeightsError(f"{folder} holds no *.safetensors or pytorch_model*.bin files; give the folder that "
                               "save_pretrained wrote (it holds config.json and the weights)")
        weights = {name: tensor for path in bins
                   for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items()}
    return {name: tensor for name, tensor in weights.items() if not IGNORED_HF_KEYS.match(name)}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into `model` (cast to its dtype); every parameter must be there with its shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = [f"{name}: {tuple(weights[name].shape)} in the checkpoint, {tuple(expected[name].shape)} in the model"
                   for name in sorted(set(expected) & set(weights)) if weights[name].shape != expected[name].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"missing: {_few(missing)}" if missing else "", f"unexpected: {_few(unexpected)}" if unexpected
                    else "", f"shape mismatch: {_few(wrong_shape)}" if wrong_shape else ""]
        raise WeightsError(f"the weights in {source} do not fit the model of this config ("
                           f"{'; '.join(p for p in problems if p)}); check the config's model sizes against the "
                           "checkpoint's config.json")
    with torch.no_grad():
        model.load_state_dict({name: weights[name].to(expected[name].dtype) for name in expected})


def _few(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
