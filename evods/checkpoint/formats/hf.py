"""An evods or InternEvo native checkpoint as a Hugging Face folder: InternLM (remote code included) or stock
Llama, with the tokenizer, the model's chat template (tokenizer_config.json) and its end of turn among the EOS ids of
generation_config.json, so that `apply_chat_template` + `generate` chats as `model.chat` does.

HF InternLM and HF Llama share evods' parameter names, so only the config differs between the two layouts.
"""
import json
import os
import tempfile

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils.hub import convert_file_size_to_int

from evods.model import InternLM2Config, InternLM2ForCausalLM, InternLMConfig, InternLMForCausalLM, Rope
from evods.model.chat_templates import CHAT_TEMPLATES, ChatTemplate, chat_template_named, stop_token_ids
from evods.model.configuration_internlm import rope_keys
from evods.model.lora import write_peft_adapter
from evods.storage.local import DEFAULT_FILE_MODE, current_umask

from ..errors import CheckpointError
from . import check_output_folder
from .checkpoint_model import read_checkpoint_model, read_lora_checkpoint
from .hf_internlm2 import to_published
from .hf_tokenizer import check_tokenizer_source, copy_tokenizer_files, write_tokenizer
from .weights import load_weights

# internlm: evods' model under its own names; internlm2: InternLM's published InternLM2 layout (hf_internlm2.py);
# llama: stock LlamaForCausalLM
FORMATS = ("internlm", "internlm2", "llama")
ADAPTER_FOLDER = "adapter"  # a LoRA export's peft folder, inside the exported base's
# InternLM's SentencePiece ids, pad is EOS; an exported tokenizer gives its own.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2


def llama_config(config: InternLMConfig) -> LlamaConfig:
    """The Llama config computing what the InternLM one does: q/k/v/o bias (unless bias-free), no MLP bias,
    rotate-half RoPE of the same type and scaling, the same KV heads, the output head tied where it is."""
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        attention_bias=config.bias, mlp_bias=False, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_keys(config.rotary)["rope_parameters"],
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


ROTARY_TYPES = ("dynamic", "origin")
# RoPE types that scale the frequencies the model was trained with: an export keeps them
SCALED_ROPE_TYPES = ("linear", "llama3")


def export_hf(src: str, tgt: str, tokenizer: str | None = None, fmt: str = "internlm", dtype: str | None = None,
              max_shard_size: str = "10GB", mlp_naming: str | None = None, rotary_type: str | None = None,
              max_pos: int | None = None, scaling_factor: float = 1.0, chat_template: str | None = None,
              base: str | None = None, merge: bool = False) -> None:
    """Write the model of the checkpoint `src` (a storage path of one evods or InternEvo native checkpoint folder) to
    the folder `tgt`. `dtype`: "float16", "bfloat16" or "float32"; None keeps the training dtype. `mlp_naming`: see
    internevo_layout.MLP_NAMINGS (native checkpoints only; None reads it off the weight shapes). `rotary_type`:
    "dynamic" (InternLM's HF default: dynamic NTK RoPE beyond max_position_embeddings, with `scaling_factor`) or
    "origin"; within max_position_embeddings both are the same. None: "dynamic", unless the model was trained with a
    scaled RoPE ("linear", "llama3"), which is kept as trained. `max_pos`: max_position_embeddings, by default the
    training config's (the length the model was trained for, where dynamic NTK starts to rescale). `chat_template`:
    a name of evods.model.chat_templates, by default the checkpoint config's (InternLM's format unless the training
    config's `model.chat_template` named another); written into config.json and, with `tokenizer`, into the tokenizer
    files and the generation config's EOS ids. A LoRA run's checkpoint (adapters only) needs `base`, the model-only
    checkpoint or HF folder it trained on: with `merge` the folder holds the merged model; without, the base model and
    the adapters as a peft folder in {tgt}/adapter (`PeftModel.from_pretrained(model, f"{tgt}/adapter")`)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r}: use one of {FORMATS}")
    if rotary_type is not None and rotary_type not in ROTARY_TYPES:
        raise CheckpointError(f"--rotary_type {rotary_type!r}: use one of {ROTARY_TYPES}")
    # every argument is checked before anything is read or written: a failed conversion leaves no half folder
    check_output_folder(tgt, "--tgt")
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise CheckpointError(f"--chat_template {chat_template!r}: use one of {', '.join(CHAT_TEMPLATES)}")
    if tokenizer:
        check_tokenizer_source(tokenizer)
    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise CheckpointError(f"--max_shard {max_shard_size!r}: give a size such as 10GB or 500MB") from None
    if max_pos is not None and max_pos < 1:
        raise CheckpointError(f"--max_pos {max_pos}: give a positive number of positions")
    if scaling_factor <= 0:
        raise CheckpointError(f"--scaling_factor {scaling_factor}: give a positive factor")
    adapters = None
    if base is not None and not merge:
        if fmt == "internlm2":
            raise CheckpointError("--format internlm2 groups q/k/v into one wqkv, which the adapters of q_proj, "
                                  "k_proj and v_proj do not fit; add --merge, or use --format internlm or llama")
        config, weights, adapters, adapter_config = read_lora_checkpoint(src, base)
    else:
        config, weights = read_checkpoint_model(src, mlp_naming, base)
    config.chat_template = chat_template or config.chat_template
    template = chat_template_named(config.chat_template)
    if config.rope.type in SCALED_ROPE_TYPES and rotary_type is not None:
        raise CheckpointError(f"--rotary_type {rotary_type}: the model was trained with RoPE type "
                              f"{config.rope.type!r}, which the export keeps; leave --rotary_type out")
    if config.tie_word_embeddings and fmt == "internlm2":
        raise CheckpointError("--format internlm2: InternLM2's layout has no tied output head, and this model ties "
                              "it (tie_word_embeddings); use --format llama or internlm")
    if config.rope.type not in SCALED_ROPE_TYPES:
        rotary_type = rotary_type or "dynamic"
        config.rotary = Rope(config.rope.base, rotary_type,
                             scaling_factor if rotary_type == "dynamic" else 1.0).as_rotary()
    config.max_position_embeddings = max_pos or config.max_position_embeddings
    config.packed_attention = "auto"  # the training machine's kernel choice is not the inference machine's
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    target_dtype = getattr(torch, dtype) if dtype else config.dtype
    with tempfile.TemporaryDirectory(prefix="evods-tokenizer-") as tokenizer_files:
        if tokenizer:  # first: a tokenizer that cannot encode the template stops the export before it writes
            chat_tokenizer = write_tokenizer(tokenizer, tokenizer_files, config.max_position_embeddings, template)
            config.bos_token_id, config.eos_token_id = chat_tokenizer.bos_token_id, chat_tokenizer.eos_token_id
            config.pad_token_id = chat_tokenizer.pad_token_id if chat_tokenizer.pad_token_id is not None \
                else chat_tokenizer.eos_token_id
        model = export_model(fmt, config)
        load_weights(model, to_published(weights, config) if fmt == "internlm2" else weights, src)
        model.to(target_dtype).save_pretrained(tgt, max_shard_size=max_shard_size)
        if adapters is not None:  # the names of HF InternLM and HF Llama, which peft finds in either
            write_peft_adapter(os.path.join(tgt, ADAPTER_FOLDER), {name: tensor.to(target_dtype)
                                                                   for name, tensor in adapters.items()},
                               adapter_config)
        if tokenizer:
            copy_tokenizer_files(tokenizer_files, tgt)
            write_generation_config(tgt, template)
    # safetensors writes its files 0600 whatever the umask; a teammate or a serving process must read them
    for name in os.listdir(tgt):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(tgt, name), DEFAULT_FILE_MODE & ~current_umask())
    if fmt == "llama":  # InternLMConfig writes them itself
        add_rope_keys(tgt, config.rotary)


def export_model(fmt: str, config: InternLMConfig) -> torch.nn.Module:
    """The model class of `fmt` with `config`'s sizes and RoPE."""
    if fmt == "internlm":
        return InternLMForCausalLM(config)
    if fmt == "llama":
        return LlamaForCausalLM(llama_config(config))
    own = ("model_type", "architectures", "auto_map", "transformers_version")
    return InternLM2ForCausalLM(InternLM2Config(**{k: v for k, v in config.to_dict().items() if k not in own}))


def add_rope_keys(folder: str, rotary: dict) -> None:
    """config.json with the RoPE keys of both transformers schemas: transformers 5's LlamaConfig writes only
    `rope_parameters`, which readers on the 4.x schema (vLLM, SGLang, LMDeploy, transformers 4) do not know."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **rope_keys(rotary)}, f, indent=2, sort_keys=True)
        f.write("\n")


def write_generation_config(folder: str, template: ChatTemplate) -> None:
    """generation_config.json with the chat's end ids, EOS and the template's end of turn (`<eoa>`, `<|im_end|>`,
    `<|eot_id|>`): `generate`, evods-serve, vLLM, LMDeploy and SGLang end a reply at any of them. A config of its
    own, not one derived from the model config: transformers 4.x replaces such a one (`_from_model_config`) by the
    model config's single EOS at `generate` time."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(template, tokenizer),
                     pad_token_id=pad).save_pretrained(folder)
