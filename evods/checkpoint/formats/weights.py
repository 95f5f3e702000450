"""Model weights with Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...), read from any source.

evods' model is the HF InternLM model, and HF InternLM and HF Llama use the same parameter names, so an HF folder of
either layout gives evods' names directly. DeepSpeed's files are consolidated here, one set per tensor rank t (ZeRO-1
does not partition parameters): with pipeline size 1 the module state in `mp_rank_{t:02d}_model_states.pt` holds
every weight of tensor rank t; with a pipeline, each `layer_XX-model_{t:02d}-model_states.pt` holds rank t's part of
one PipelineModule layer, named back through `pipeline_parameter_name`. The tensor ranks' shards are then merged as the
tensor-parallel plan says (`evods.parallel.TensorParallelSplit`), the table that sliced them: concatenated along the
split dims, the copies of KV heads that several ranks share taken once. Under ZeRO-3
the model files hold no weights: each data rank's optimizer partition holds its fp32 shard of them, which DeepSpeed's
zero_to_fp32 consolidates (evods runs ZeRO-3 without tensor parallelism, so there is one set).
"""
import contextlib
import glob
import io
import json
import os
import re
from collections import defaultdict

import torch
from safetensors.torch import load_file

from evods.model import HeadSplit
from evods.model.lora import is_lora_parameter
from evods.parallel import TensorParallelSplit, pipeline_parameter_name
from evods.parallel.zero import full_shape, gathered

from .. import safe_load
from ..errors import CheckpointError
from ..layout import DEEPSPEED_TAG, MODEL_CONFIG, TOPOLOGY

# Buffers some HF InternLM checkpoints carry (InternLM's convert2hf.py) that evods recomputes.
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


class WeightsError(CheckpointError, ValueError):
    """Model weights that cannot be read or do not fit the model; the message says which file or key and what to do."""


def deepspeed_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full HF-named weights of an evods checkpoint folder (local), consolidated from DeepSpeed's model files of
    every tensor rank (`topology.json` says how many)."""
    tensor_size = _saved_tensor_size(checkpoint_dir)
    tag_dir = os.path.join(checkpoint_dir, DEEPSPEED_TAG)
    layer_files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")))
    if glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_model_states.pt")):
        return _zero3_weights(checkpoint_dir)
    if layer_files:
        shards = _pipeline_shards(layer_files, tensor_size, checkpoint_dir)
    else:
        shards = [_module_shard(tag_dir, rank, checkpoint_dir) for rank in range(tensor_size)]
    return merge_tensor_parallel_shards(shards, _kv_replicas(checkpoint_dir, tensor_size), checkpoint_dir)


def merge_tensor_parallel_shards(shards: list[dict[str, torch.Tensor]], kv_replicas: int,
                                 source: str) -> dict[str, torch.Tensor]:
    """Full HF-named weights from each tensor rank's HF-named state (in rank order), merged as the plan split them
    (`kv_replicas` ranks holding each KV head); a replicated weight (norms, the o_proj bias) is tensor rank 0's."""
    if len(shards) == 1:
        return shards[0]
    for rank, shard in enumerate(shards[1:], start=1):
        if shard.keys() != shards[0].keys():
            differ = sorted(shard.keys() ^ shards[0].keys())
            raise WeightsError(f"{source}: tensor ranks 0 and {rank} hold different parameters ({_few(differ)}); "
                               "the checkpoint is damaged")
    split = TensorParallelSplit(len(shards), _embedding_splits_hidden(shards[0], source), kv_replicas)
    return {name: split.merge(name, [shard[name] for shard in shards]) for name in shards[0]}


def _kv_replicas(checkpoint_dir: str, tensor_size: int) -> int:
    """How many tensor ranks held each KV head, from the checkpoint's config.json (a config without
    num_key_value_heads is multi-head)."""
    path = os.path.join(checkpoint_dir, MODEL_CONFIG)
    if tensor_size == 1:
        return 1
    if not os.path.isfile(path):
        raise WeightsError(f"{checkpoint_dir} has no {MODEL_CONFIG}, which says how its {tensor_size} tensor ranks "
                           "split the attention heads; give the folder of a complete evods checkpoint")
    with open(path) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    return HeadSplit(heads, config.get("num_key_value_heads") or heads, tensor_size).kv_replicas


def _embedding_splits_hidden(shard: dict[str, torch.Tensor], source: str) -> bool:
    """Whether the run split the embedding over hidden (InternEvo's embed_split_hidden), read off the shard shapes:
    split over the vocabulary it is [vocab/tp, hidden], the shape of the (always vocabulary-split) lm_head shard;
    split over hidden it is [vocab, hidden/tp]."""
    embedding, head = shard.get("model.embed_tokens.weight"), shard.get("lm_head.weight")
    if embedding is None and head is None and all(map(is_lora_parameter, shard)):
        return False  # a LoRA run's adapters alone: no embedding, whose split would matter
    if embedding is None or head is None:
        raise WeightsError(f"{source}: the model files lack model.embed_tokens.weight or lm_head.weight")
    return embedding.shape != head.shape


def _saved_tensor_size(checkpoint_dir: str) -> int:
    path = os.path.join(checkpoint_dir, TOPOLOGY)
    if not os.path.isfile(path):
        raise WeightsError(f"{checkpoint_dir} has no {TOPOLOGY}, which says the tensor size its model files were "
                           "saved with; is it an evods checkpoint? An HF folder needs ckpt_type='hf'")
    with open(path) as f:
        return int(json.load(f).get("tp", 1))


def _zero3_weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The weights of a ZeRO-3 checkpoint, from its fp32 shards, in the dtype the model trained in (the dtype of its
    model files' placeholders): DeepSpeed's own weights are its fp32 master weights cast to that dtype."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, DEEPSPEED_TAG)
    placeholders = safe_load.load_file(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                       safe_load.deepspeed_objects())["module"]
    # zero_to_fp32 reads the files with torch.load(weights_only=False) and prints its progress
    with safe_load.deepspeed_loads_weights_only(), contextlib.redirect_stdout(io.StringIO()):
        weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DEEPSPEED_TAG)
    return {name: tensor.to(placeholders[name].dtype) if name in placeholders else tensor
            for name, tensor in weights.items()}


def _module_shard(tag_dir: str, tensor_rank: int, checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Tensor rank `tensor_rank`'s weights of a plain (unpipelined) module; DeepSpeed names the file by the mpu's
    model-parallel rank, which is the tensor rank when there is no pipeline."""
    module_file = os.path.join(tag_dir, f"mp_rank_{tensor_rank:02d}_model_states.pt")
    if not os.path.isfile(module_file):
        raise WeightsError(f"{checkpoint_dir} has no DeepSpeed model file {module_file} (nor layer_*-model_states.pt)"
                           "; is it an evods checkpoint? An HF folder needs ckpt_type='hf'")
    return dict(safe_load.load_file(module_file, safe_load.deepspeed_objects())["module"])


def _pipeline_shards(layer_files: list[str], tensor_size: int, checkpoint_dir: str) -> list[dict[str, torch.Tensor]]:
    """Each tensor rank's HF-named weights from the PipelineModule's per-layer files."""
    layers_of_rank = defaultdict(dict)  # tensor rank -> {layer index: file}
    for path in layer_files:
        index, tensor_rank = map(int, _LAYER_FILE.search(path).groups())
        layers_of_rank[tensor_rank][index] = path
    if sorted(layers_of_rank) != list(range(tensor_size)):
        raise WeightsError(f"{checkpoint_dir} holds layer files of tensor ranks {sorted(layers_of_rank)}, but its "
                           f"{TOPOLOGY} says tensor size {tensor_size}; the checkpoint is incomplete")
    num_layers = len(layers_of_rank[0]) - 2  # embedding and head around the decoder layers
    shards = []
    for tensor_rank in range(tensor_size):
        weights = {}
        for index, path in sorted(layers_of_rank[tensor_rank].items()):
            for local_name, tensor in safe_load.load_file(path).items():
                weights[pipeline_parameter_name(index, local_name, num_layers)] = tensor
        shards.append(weights)
    return shards


TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


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
        weights = {name: tensor for path in bins for name, tensor in safe_load.load_file(path).items()}
    return {name: tensor for name, tensor in weights.items() if not IGNORED_HF_KEYS.match(name)}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into `model` (cast to its dtype); every parameter must be there with its shape. A model built
    under ZeRO-3 takes them too: each parameter is gathered whole around its copy (every rank copies the same)."""
    expected = model.state_dict(keep_vars=True)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and TIED_HEAD not in weights and TIED_EMBEDDING in weights:  # save_pretrained keeps one copy of it
        weights = {**weights, TIED_HEAD: weights[TIED_EMBEDDING]}
    shapes = {name: tuple(full_shape(tensor)) for name, tensor in expected.items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = [f"{name}: {tuple(weights[name].shape)} in the checkpoint, {shapes[name]} in the model"
                   for name in sorted(set(expected) & set(weights)) if tuple(weights[name].shape) != shapes[name]]
    check_weights_fit(missing, unexpected, wrong_shape, source)
    with torch.no_grad():
        for name, tensor in expected.items():
            with gathered([tensor], modifier_rank=0):
                tensor.data.copy_(weights[name])


def check_weights_fit(missing: list[str], unexpected: list[str], wrong_shape: list[str], source: str) -> None:
    """Refuse in one line weights that lack some of the model's parameters, hold others, or differ in shape."""
    if (bias_cause := _bias_mismatch(missing, unexpected)) and not wrong_shape:
        raise WeightsError(f"the weights in {source} do not fit the model of this config: {bias_cause}")
    if missing or unexpected or wrong_shape:
        problems = [f"missing: {_few(missing)}" if missing else "", f"unexpected: {_few(unexpected)}" if unexpected
                    else "", f"shape mismatch: {_few(wrong_shape)}" if wrong_shape else ""]
        raise WeightsError(f"the weights in {source} do not fit the model of this config ("
                           f"{'; '.join(p for p in problems if p)}); check the config's model sizes against the "
                           "checkpoint's config.json")


ATTENTION_BIAS = re.compile(r".*self_attn\.[qkvo]_proj\.bias$")


def _bias_mismatch(missing: list[str], unexpected: list[str]) -> str | None:
    """What to do when only the q/k/v/o biases differ (InternEvo's LLaMA-family checkpoints are bias-free)."""
    if missing and not unexpected and all(map(ATTENTION_BIAS.match, missing)):
        return ("the checkpoint has no q/k/v/o bias, but the model has (bias=True): set no_bias=True in the model "
                "config, InternEvo's key for a bias-free model")
    if unexpected and not missing and all(map(ATTENTION_BIAS.match, unexpected)):
        return "the checkpoint has q/k/v/o biases, but the model is bias-free (no_bias=True): remove no_bias"
    return None


def _few(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
