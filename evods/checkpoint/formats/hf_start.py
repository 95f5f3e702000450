"""A Hugging Face folder as a training start (`load_ckpt_info=dict(..., ckpt_type="hf_llama")`), read rank by rank.

InternEvo names a `LlamaForCausalLM` folder "hf_llama" and any HF folder "hf_model" in its LOAD_FUNC_DICT
(internlm/checkpoint/load_funcs.py); its newer versions load with ckpt_type "hf" (the model's own HF loader). evods
accepts the three: "hf_llama" insists on a Llama folder (config.json's architectures / model_type), "hf" and
"hf_model" read any folder with evods' names (HF InternLM, Llama, InternLM's published InternLM2).

Checked on rank 0 before the model is built (`check_hf_folder`): config.json is there, it is a Llama folder for
"hf_llama", and every shard the safetensors index names exists. Read after tensor parallelism has split the model
(`load_rank_parts`): each rank opens the safetensors files with `safetensors.safe_open` and reads only the tensors of
its pipeline stage and, of a tensor-split weight, only its own slice (`get_slice`), cut as `TensorParallelSplit` cuts
it, so that no rank reads the whole model. Folders that are not safetensors (pytorch_model*.bin, or the published
InternLM2 layout, whose fused wqkv is regrouped whole) are read whole and sliced the same way.
"""
import contextlib
import glob
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from evods.model.lora import is_lora_parameter
from evods.parallel import TensorParallelSplit, pipeline_layer_index
from evods.parallel.zero import full_shape, gathered, is_sharded

from ..errors import CheckpointError
from ..layout import MODEL_CONFIG, join
from .hf_internlm2 import is_published_internlm2, read_published
from .weights import IGNORED_HF_KEYS, TIED_EMBEDDING, TIED_HEAD, WeightsError, _few, check_weights_fit, hf_weights

HF_CKPT_TYPES = ("hf", "hf_llama", "hf_model")
LLAMA_ARCHITECTURE, LLAMA_MODEL_TYPE = "LlamaForCausalLM", "llama"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# config.json keys (with transformers' LlamaConfig defaults) that must agree with the run's model besides the sizes
# (plan.MODEL_SHAPE_FIELDS), under the run's config attribute of the same meaning
LLAMA_LAYOUT_FIELDS = {"tie_word_embeddings": ("tie_word_embeddings", False), "attention_bias": ("bias", False)}


def check_hf_folder(storage, folder: str, ckpt_type: str, where: str) -> None:
    """Refuse in one line an HF folder that cannot start this run (before anything is built)."""
    try:
        config = json.loads(storage.read_bytes(join(folder, MODEL_CONFIG)))
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no {MODEL_CONFIG}: give the folder save_pretrained wrote") from None
    if ckpt_type == "hf_llama":
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        if LLAMA_ARCHITECTURE not in architectures and model_type != LLAMA_MODEL_TYPE:
            raise CheckpointError(
                f"{where} is not a Hugging Face Llama folder ({MODEL_CONFIG}: architectures {architectures}, "
                f"model_type {model_type!r}); ckpt_type='hf_llama' reads {LLAMA_ARCHITECTURE} folders, and "
                "ckpt_type='hf' HF InternLM ones")
    if storage.exists(join(folder, SAFETENSORS_INDEX)):
        index = json.loads(storage.read_bytes(join(folder, SAFETENSORS_INDEX)))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [shard for shard in shards if not storage.exists(join(folder, shard))]
        if missing:
            raise CheckpointError(f"{where}: shard {_few(missing)} named by {SAFETENSORS_INDEX} is missing (the folder "
                                  f"holds {len(shards) - len(missing)} of its {len(shards)} shards); copy the whole "
                                  "folder")


def layout_differences(config: dict, model_config) -> list[str]:
    """The Llama layout keys of an HF `config` (config.json) that disagree with the run's `model_config`, each as
    'name there, here'."""
    return [f"{key} {config.get(key, default)} there, {getattr(model_config, attribute)} here"
            for key, (attribute, default) in LLAMA_LAYOUT_FIELDS.items()
            if config.get(key, default) != getattr(model_config, attribute)]


@dataclass(frozen=True)
class RankPart:
    """What one rank holds of the model: its tensor rank's slices (`split`), and, under a pipeline, the
    `pipeline_layers()` indices of its stage (None: all)."""

    split: TensorParallelSplit
    tp_rank: int
    num_layers: int
    stage_layers: range | None = None

    def holds(self, name: str) -> bool:
        return self.stage_layers is None or pipeline_layer_index(name, self.num_layers) in self.stage_layers


class SafetensorsFolder(contextlib.ExitStack):
    """The tensors of a folder's safetensors files, open for reading by part.

    What `read` returns is a view of the file's private (copy-on-write) memory mapping, as safetensors' get_slice
    gives it: its pages are read when first touched, and writing to it never reaches the file. A parameter can take
    it as its storage (`mapped`), as transformers' from_pretrained does, instead of copying it into fresh memory.
    """

    mapped = True

    def __init__(self, folder: str):
        super().__init__()
        self.files = {}
        index = os.path.join(folder, SAFETENSORS_INDEX)
        if os.path.isfile(index):  # the shards it names, not any other safetensors file lying beside them
            with open(index) as f:
                paths = sorted({os.path.join(folder, shard) for shard in json.load(f)["weight_map"].values()})
        else:
            paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        for path in paths:
            handle = self.enter_context(safe_open(path, framework="pt"))
            self.files.update(dict.fromkeys(handle.keys(), handle))

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[name].get_slice(name).get_shape())

    def read(self, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
        if part is None:
            return self.files[name].get_tensor(name)
        dim, start, stop = part
        return self.files[name].get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]


class WholeWeights(contextlib.ExitStack):
    """Weights already read whole, sliced the same way."""

    mapped = False  # a slice is a view that would keep the whole weight in memory: copy it

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights

    def names(self) -> set[str]:
        return set(self.weights)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)

    def read(self, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
        return self.weights[name] if part is None else self.weights[name].narrow(part[0], part[1], part[2] - part[1])


def open_hf_folder(folder: str) -> SafetensorsFolder | WholeWeights:
    """The folder's weights, read by part where they are safetensors with evods' names."""
    if is_published_internlm2(folder):
        return WholeWeights(read_published(folder))
    if glob.glob(os.path.join(folder, "*.safetensors")):
        return SafetensorsFolder(folder)
    return WholeWeights(hf_weights(folder))


def load_rank_parts(model: torch.nn.Module, folder: str, rank: RankPart, source: str) -> None:
    """Copy this rank's part of the HF folder's weights into `model` (already split by tensor parallelism; its LoRA
    adapters, absent from the folder, are left as they are), cast to the model's dtype. Parameters of other pipeline
    stages are not read. Every parameter of the model must be in the folder with its shape."""
    expected = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
                if not is_lora_parameter(name)}
    with open_hf_folder(folder) as weights:
        present = {name for name in weights.names() if not IGNORED_HF_KEYS.match(name)}
        source_of = dict.fromkeys(present, None)
        if model.config.tie_word_embeddings and TIED_HEAD not in present and TIED_EMBEDDING in present:
            source_of[TIED_HEAD] = TIED_EMBEDDING  # save_pretrained keeps one copy of the tied weight
        held = [name for name in expected if rank.holds(name) and name in source_of]
        parts, wrong_shape = {}, []
        for name in held:
            stored_shape = weights.shape(source_of[name] or name)
            parts[name] = part = _part(rank, name, stored_shape, source)
            local_shape = list(stored_shape)
            if part is not None:
                local_shape[part[0]] = part[2] - part[1]
            model_shape = tuple(full_shape(expected[name]))  # (whole under ZeRO-3, which has no tensor split)
            if tuple(local_shape) != model_shape:
                wrong_shape.append(f"{name}: {stored_shape} in the checkpoint ({tuple(local_shape)} of it at tensor "
                                   f"rank {rank.tp_rank}), {model_shape} in the model")
        check_weights_fit(sorted(set(expected) - set(source_of)), sorted(set(source_of) - set(expected)),
                          wrong_shape, source)
        with torch.no_grad():
            for name in held:
                tensor, stored = expected[name], weights.read(source_of[name] or name, parts[name])
                if weights.mapped and tensor.requires_grad and not is_sharded(tensor):
                    # The mapped slice becomes the parameter's storage (a contiguous one as it is; a row-parallel
                    # weight's column slice, or another dtype, copied once): no second copy of the part into fresh
                    # memory. DeepSpeed's ZeRO-1/2 optimizer copies every trainable parameter into its flat buffers
                    # when the engine is built, which ends the mapping. A frozen one (a LoRA base) would keep it for
                    # the whole run, exposed to the folder being rewritten: copied.
                    tensor.data = stored.to(tensor.dtype).contiguous()
                    continue
                with gathered([tensor], modifier_rank=0):
                    tensor.data.copy_(stored)


def _part(rank: RankPart, name: str, full_shape: tuple, source: str) -> tuple[int, int, int] | None:
    try:
        return rank.split.part(name, full_shape, rank.tp_rank)
    except ValueError as error:
        raise WeightsError(f"the weights in {source}: {error}") from None
