"""Build the InternLM HF model from an InternEvo training config's `model` dict: InternEvo's INTERNLM (v1), INTERNLM2
(INTERNLM2_PUBLIC in its older configs), INTERNLM3 and LLAMA2 model types, which are one decoder in different sizes
(grouped KV heads, no biases, another RoPE base or scaling, a tied output head; InternEvo's `modeling_internlm2.py`
builds InternLM3 with the InternLM2 class too)."""

import math

import torch

from .chat_templates import DEFAULT_CHAT_TEMPLATE
from .configuration_internlm import InternLMConfig, Rope
from .modeling_internlm import InternLMForCausalLM, set_activation_checkpointing
from .registry import MODEL_INITIALIZER

# Keys that shape InternEvo's training run (parallelism, recompute, kernels) or the layout of its checkpoint files, not
# the model's math. They are accepted; `checkpoint` is applied by the builder below, num_chunks by the pipeline
# builder, and the layout keys by the native checkpoint reader and writer (evods/checkpoint/formats/internevo.py):
# adapt_hf and qk_interleaved say whether the q/k rows are in HF's rotate-half order or interleaved (a model trained
# either way computes the same; only the stored row order differs), enable_qkv_fusion=False stores q, k and v apart
# (InternLM3) instead of one grouped wqkv.
TRAINING_ONLY_KEYS = {
    "checkpoint",
    "embed_split_hidden",
    "parallel_output",
    "embed_grad_scale",
    "apply_post_layer_norm",
    "use_flash_attn",
    "num_chunks",
    "adapt_hf",
    "qk_interleaved",
    "enable_qkv_fusion",
}
MLP_MULTIPLE_OF = 256
NORM_HEAD_REFUSAL = ("norm_head=True (InternEvo's output head with L2-normalised rows) is not supported by evods; set "
                     "norm_head=False to train a plain output head")


def intermediate_size(hidden_size: int, mlp_ratio: float, multiple_of: int = MLP_MULTIPLE_OF) -> int:
    """int(hidden * mlp_ratio) rounded up to a multiple of `multiple_of` (4096 * 8/3 -> 11008), as InternEvo's MLP
    (its model key `multiple_of`, 256 unless given)."""
    return math.ceil(int(hidden_size * mlp_ratio) / multiple_of) * multiple_of


def config_from_model_dict(model: dict) -> InternLMConfig:
    """InternLMConfig from InternEvo's `model = dict(...)` (keys as in configs/7B_sft.py)."""
    known = TRAINING_ONLY_KEYS | {
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "mlp_ratio",
        "vocab_size",
        "layer_norm_epsilon",
        "dtype",
        "norm_type",
        "use_dynamic_ntk_rope",
        "max_position_embeddings",
        "rope_base",
        "no_bias",
        "num_kv_attention_heads",
        "norm_head",
        "multiple_of",
        "chat_template",  # evods' own: the chat format the model is fine-tuned in (evods.model.chat_templates)
        # evods' own, under transformers' names (Llama-3 family): a scaled RoPE and an output head tied to the input
        # embedding
        "rope_scaling",
        "tie_word_embeddings",
    }
    unknown = sorted(set(model) - known)
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
    norm_type = model.get("norm_type", "rmsnorm")
    if norm_type != "rmsnorm":
        raise ValueError(f"model config: norm_type={norm_type!r} is not supported; InternLM uses 'rmsnorm'.")
    hidden_size = model.get("hidden_size", 2048)
    num_attention_heads = model.get("num_attention_heads", 32)
    if model.get("norm_head", False):
        raise ValueError(f"model config: {NORM_HEAD_REFUSAL}")
    dtype = model.get("dtype", torch.float32)
    return InternLMConfig(
        vocab_size=model.get("vocab_size", 50304),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size(hidden_size, model.get("mlp_ratio", 4.0),
                                            model.get("multiple_of", MLP_MULTIPLE_OF)),
        num_hidden_layers=model.get("num_layers", 48),
        num_attention_heads=num_attention_heads,
        # grouped-query attention (InternEvo's InternLM2 and LLaMA models); None: multi-head
        num_key_value_heads=model.get("num_kv_attention_heads"),
        rms_norm_eps=model.get("layer_norm_epsilon", 1e-5),
        bias=not model.get("no_bias", False),  # InternEvo's key for q/k/v/o without bias (its LLaMA configs)
        max_position_embeddings=model.get("max_position_embeddings", 2048),
        rotary=model_rope(model).as_rotary(),
        tie_word_embeddings=model.get("tie_word_embeddings", False),
        dtype=getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype,
        # use_flash_attn=False keeps flash-attn out even where it is installed
        packed_attention="auto" if model.get("use_flash_attn", True) else "loop",
        chat_template=model.get("chat_template", DEFAULT_CHAT_TEMPLATE),
    )


def model_rope(model: dict) -> Rope:
    """The RoPE of a `model` dict: base `rope_base`; `rope_scaling` in transformers' spelling
    (`{"rope_type": "linear" | "dynamic" | "llama3", "factor": f, ...}`, as a Llama config.json has it), else
    InternEvo's `use_dynamic_ntk_rope`, which trains dynamic NTK with a scaling factor of 1 (its modeling_internlm2.py;
    exports may set another)."""
    base = model.get("rope_base", 10000)
    rope_scaling = model.get("rope_scaling")
    if rope_scaling is None:
        return Rope(base, "dynamic" if model.get("use_dynamic_ntk_rope", False) else "origin")
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"model config: rope_scaling={rope_scaling!r} is not a dict; give transformers' form, e.g. "
                         'dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, '
                         "original_max_position_embeddings=8192)")
    if model.get("use_dynamic_ntk_rope", False):
        raise ValueError(f"model config: rope_scaling={rope_scaling} with use_dynamic_ntk_rope=True: give one of the "
                         'two (rope_scaling=dict(rope_type="dynamic", factor=f) is dynamic NTK with a factor)')
    try:
        return Rope.from_hf(base, rope_scaling)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model config: rope_scaling={rope_scaling}: {error}") from None


# The chat format each model type is published with (evods.model.chat_templates), where the model dict names none:
# InternLM2/2.5 and InternLM3 chat in ChatML
MODEL_TYPE_CHAT_TEMPLATES = {"INTERNLM": DEFAULT_CHAT_TEMPLATE, "INTERNLM2": "internlm2",
                             "INTERNLM2_PUBLIC": "internlm2", "INTERNLM3": "internlm2"}


@MODEL_INITIALIZER.register_module("INTERNLM")
def build_internlm(**model: object) -> InternLMForCausalLM:
    config = config_from_model_dict(model)
    internlm = InternLMForCausalLM(config).to(config.dtype)
    set_activation_checkpointing(internlm, model.get("checkpoint", False))
    return internlm


@MODEL_INITIALIZER.register_module("LLAMA2")
def build_llama(**model: object) -> InternLMForCausalLM:
    """InternEvo's LLAMA2 (Llama-2 and Llama-3 shapes: grouped KV heads, `no_bias=True`, `rope_scaling`,
    `tie_word_embeddings`): the same model; `tools/convert2hf.py --format llama` exports it as `LlamaForCausalLM`."""
    return build_internlm(**model)


@MODEL_INITIALIZER.register_module("INTERNLM2")
@MODEL_INITIALIZER.register_module("INTERNLM2_PUBLIC")
@MODEL_INITIALIZER.register_module("INTERNLM3")
def build_internlm2(**model: object) -> InternLMForCausalLM:
    """The same model; its chat format is the family's unless the model dict names another."""
    return build_internlm(**{"chat_template": MODEL_TYPE_CHAT_TEMPLATES["INTERNLM2"], **model})
