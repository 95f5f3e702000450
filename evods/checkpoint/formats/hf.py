"""An evods or InternEvo native checkpoint as a Hugging Face folder: InternLM (remote code included) or stock
Llama, with the tokenizer.

HF InternLM and HF Llama share evods' parameter names, so only the config differs between the two layouts.
"""
import json
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evods.model import InternLMConfig, InternLMForCausalLM
from evods.storage.local import DEFAULT_FILE_MODE, current_umask

from transformers.utils.hub import convert_file_size_to_int

from . import check_output_folder
from .checkpoint_model import read_checkpoint_model
from ..errors import CheckpointError
from .weights import load_weights

FORMATS = ("internlm", "llama")
# InternLM's SentencePiece ids (§7.4); pad is EOS.
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2


def llama_config(config: InternLMConfig) -> LlamaConfig:
    """The Llama config computing what the InternLM one does: q/k/v/o bias, no MLP bias, rotate-half RoPE."""
    rotary = config.rotary
    rope = {"rope_type": "default", "rope_theta": float(rotary["base"])}
    if rotary["type"] == "dynamic":
        rope = {**rope, "rope_type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        attention_bias=True, mlp_bias=False, tie_word_embeddings=False, rope_parameters=rope,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


ROTARY_TYPES = ("dynamic", "origin")


def export_hf(src: str, tgt: str, tokenizer: str | None = None, fmt: str = "internlm", dtype: str | None = None,
              max_shard_size: str = "10GB", mlp_naming: str = "v1", rotary_type: str = "dynamic") -> None:
    """Write the model of the checkpoint `src` (a storage path of one evods or InternEvo native checkpoint folder) to
    the folder `tgt`. `dtype`: "float16", "bfloat16" or "float32"; None keeps the training dtype. `mlp_naming`: see
    internevo_layout.MLP_NAMINGS (native checkpoints only). `rotary_type`: "dynamic" (InternLM's HF default: dynamic NTK
    RoPE beyond max_position_embeddings) or "origin"; within the trained length both are the same."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r}: use one of {FORMATS}")
    if rotary_type not in ROTARY_TYPES:
        raise CheckpointError(f"--rotary_type {rotary_type!r}: use one of {ROTARY_TYPES}")
    # every argument is checked before anything is read or written: a failed conversion leaves no half folder
    check_output_folder(tgt, "--tgt")
    add_dummy_prefix = _sentencepiece_adds_dummy_prefix(tokenizer) if tokenizer else None
    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise CheckpointError(f"--max_shard {max_shard_size!r}: give a size such as 10GB or 500MB") from None
    config, weights = read_checkpoint_model(src, mlp_naming)
    config.rotary = {**config.rotary, "type": rotary_type}
    config.packed_attention = "auto"  # the training machine's kernel choice is not the inference machine's
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    target_dtype = getattr(torch, dtype) if dtype else config.dtype
    model = InternLMForCausalLM(config) if fmt == "internlm" else LlamaForCausalLM(llama_config(config))
    load_weights(model, weights, src)
    model.to(target_dtype).save_pretrained(tgt, max_shard_size=max_shard_size)
    # safetensors writes its files 0600 whatever the umask; a teammate or a serving process must read them
    for name in os.listdir(tgt):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(tgt, name), DEFAULT_FILE_MODE & ~current_umask())
    if tokenizer:
        write_tokenizer(tokenizer, add_dummy_prefix, tgt, config.max_position_embeddings)


def write_tokenizer(sentencepiece_model: str, add_dummy_prefix: bool, tgt: str, max_length: int) -> None:
    """tokenizer.model plus the configs that make `AutoTokenizer` read it as a BOS-adding Llama-style tokenizer."""
    shutil.copyfile(sentencepiece_model, os.path.join(tgt, "tokenizer.model"))
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        "add_prefix_space": add_dummy_prefix,
                        "clean_up_tokenization_spaces": False, "model_max_length": max_length, **SPECIAL_TOKENS}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", SPECIAL_TOKENS)):
        with open(os.path.join(tgt, name), "w") as f:
            json.dump(content, f, indent=2)


def _sentencepiece_adds_dummy_prefix(sentencepiece_model: str) -> bool:
    """Whether SentencePiece prepends "▁" to the text (V7_sft.model does not), which HF must do the same; reading it
    also checks that the file is a SentencePiece model."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(sentencepiece_model):
        raise CheckpointError(f"--tokenizer {sentencepiece_model}: no such file (give a SentencePiece .model file, "
                              "e.g. tools/V7_sft.model)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(sentencepiece_model, "rb") as f:
            proto.ParseFromString(f.read())
    except DecodeError:
        raise CheckpointError(f"--tokenizer {sentencepiece_model} is not a SentencePiece model file") from None
    return proto.normalizer_spec.add_dummy_prefix
