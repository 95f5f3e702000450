"""InternLM's published InternLM2 Hugging Face layout (`InternLM2ForCausalLM`, evods.model.modeling_internlm2): the
names of InternLM2's native files (internevo_layout.py, family "internlm2", at tensor and pipeline size 1) under the
HF model's `model.` prefix, the output head outside it. Its weights are read into, and written from, evods' names.

Published folders say `"model_type": "internlm2"` or, the early ones, `"internlm"` with InternLM2's classes in
`auto_map`; `architectures` tells them apart from InternLM v1 and InternLM3 folders, which use evods' (Llama's) names.
"""
import json
import os

import torch

from evods.model import InternLM2Config

from .internevo_layout import AttentionHeads, NativeLayout, merge_shards, shard_weights
from .weights import hf_weights

ARCHITECTURE = "InternLM2ForCausalLM"
OUTSIDE_THE_MODEL = "output."  # the head: `output.weight`, where every other name starts with `model.`


def layout(config) -> NativeLayout:
    """InternLM2's one-file layout for an HF config (evods' or the published one: the same field names)."""
    heads = config.num_attention_heads
    return NativeLayout(tp=1, pp=1, num_layers=config.num_hidden_layers, family="internlm2", mlp_naming="v2",
                        bias=config.bias, heads=AttentionHeads(heads, config.num_key_value_heads,
                                                               config.hidden_size // heads))


def to_published(weights: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """evods' HF-named weights under InternLM2's published names."""
    native = shard_weights(weights, layout(config))[(0, 0)]
    return {(name if name.startswith(OUTSIDE_THE_MODEL) else f"model.{name}"): tensor
            for name, tensor in native.items()}


def from_published(weights: dict[str, torch.Tensor], config, source: str) -> dict[str, torch.Tensor]:
    """InternLM2's published weights under evods' names."""
    native = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
    return merge_shards({(0, 0): native}, layout(config), source)


def read_published(folder: str) -> dict[str, torch.Tensor]:
    """The weights of a published-layout InternLM2 folder under evods' names (its config.json gives the heads)."""
    return from_published(hf_weights(folder), InternLM2Config.from_pretrained(folder), folder)


def is_published_internlm2(folder: str) -> bool:
    """Whether the HF folder's config.json names InternLM2's published model class."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return ARCHITECTURE in (json.load(f).get("architectures") or ())
