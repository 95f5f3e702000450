"""InternLM (v1) configuration, with the field names of InternLM's published Hugging Face config.json.

This file imports only transformers and chat_templates.py and runs under transformers 4.36 to 5.x: `save_pretrained`
copies it next to the weights, so that the folder loads with `trust_remote_code=True` where evods is not installed
(see modeling_internlm.py). That is why it is written in the classic `__init__` style, which every version accepts,
rather than as transformers 5's dataclass fields.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

from .chat_templates import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE

ROTARY_TYPES = ("origin", "dynamic")
# Written into config.json from `rotary` for the readers that do not know it; `rotary` is what this model reads.
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
PACKED_ATTENTION_BACKENDS = ("auto", "flash", "varlen", "flex", "loop", "mask")


def rope_keys(rotary: dict) -> dict:
    """InternEvo's `rotary` as the RoPE keys that other code reads from config.json: `rope_theta` and `rope_scaling`
    (transformers 4.x's Llama schema, read by vLLM's and SGLang's Llama code and by LMDeploy) and `rope_parameters`
    (transformers 5.x's). Their "dynamic" is the same dynamic NTK as evods': past max_position_embeddings, the base
    for a length L is base * (factor * L / max_position_embeddings - (factor - 1)) ** (d / (d - 2)).

    `rope_scaling` holds exactly `type` and `factor`, the only form transformers 4.36 accepts (it also requires a
    factor above 1, so a factor-1 "dynamic" is readable as such from transformers 4.43 on).
    """
    theta = float(rotary["base"])
    if rotary["type"] == "origin":
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    factor = float(rotary.get("scaling_factor", 1.0))
    return {"rope_theta": theta, "rope_scaling": {"type": "dynamic", "factor": factor},
            "rope_parameters": {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}}


class InternLMConfig(PreTrainedConfig):
    r"""Configuration of an InternLM v1 model (LLaMA layout with bias on q/k/v/o, rotate-half RoPE, SwiGLU).

    `bias` puts biases on q/k/v/o (InternLM v1); False is the bias-free layout of InternEvo's `no_bias=True`.

    `rotary` is `{"base": float, "type": "origin" | "dynamic", "scaling_factor": float}`: "dynamic" rescales the
    RoPE base (dynamic NTK) once the sequence is longer than `max_position_embeddings`; "origin" never does.

    `packed_attention` chooses the attention kernel for packed rows (inputs without `attention_mask` and without a
    filled cache, where documents start wherever `position_ids == 0`):
    - "auto": on CUDA the first available of "flash", "varlen", "flex"; elsewhere "loop";
    - "flash": flash-attn's `flash_attn_varlen_func` (CUDA only);
    - "varlen": torch's own varlen flash kernel, `torch.nn.attention.varlen` (CUDA, torch >= 2.10; no extra package);
    - "flex": torch's flex attention with a document mask (compiled on CUDA; forward only on CPU);
    - "loop": one causal SDPA call per document (fastest on CPU);
    - "mask": one SDPA call with a block-diagonal causal mask (a slow, independent reference).
    Padded batches and generation with a cache use transformers' `attn_implementation` ("sdpa", "eager",
    "flash_attention_2", ... on transformers 5; "sdpa" or "eager" on transformers 4) instead.

    `chat_template` names the model's chat format in evods.model.chat_templates ("internlm", "internlm2", "llama3"):
    the format of `model.chat` and of the exported tokenizer's chat template.

    `rope_theta`, `rope_scaling` and `rope_parameters` (see `rope_keys`) are derived from `rotary`: saved configs carry
    them, serving engines read them off the loaded config, and their values in a config.json are not read.
    """

    model_type = "internlm"

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rotary=None,
        packed_attention="auto",
        chat_template=DEFAULT_CHAT_TEMPLATE,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        # InternEvo's HF default; scaling_factor defaults to 1
        self.rotary = rotary if rotary is not None else {"base": 10000, "type": "dynamic"}
        self.packed_attention = packed_attention
        self.chat_template = chat_template
        self._check()
        for key in ROPE_KEYS:
            kwargs.pop(key, None)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.derive_rope_keys()

    def derive_rope_keys(self) -> None:
        """Set `rope_theta`, `rope_parameters` and (on transformers 4) `rope_scaling` from `rotary`; call it after
        changing `rotary`. vLLM and LMDeploy read them off the config object that this remote code builds."""
        keys = rope_keys(self.rotary)
        self.rope_theta, self.rope_parameters = keys["rope_theta"], keys["rope_parameters"]
        if not isinstance(getattr(type(self), "rope_scaling", None), property):  # transformers 5: a view of the above
            self.rope_scaling = keys["rope_scaling"]

    def _check(self) -> None:
        if self.rotary.get("type") not in ROTARY_TYPES:
            raise ValueError(
                f"InternLMConfig.rotary['type'] is {self.rotary.get('type')!r}; expected one of {ROTARY_TYPES}."
            )
        if self.packed_attention not in PACKED_ATTENTION_BACKENDS:
            raise ValueError(
                f"InternLMConfig.packed_attention is {self.packed_attention!r}; "
                f"expected one of {PACKED_ATTENTION_BACKENDS}."
            )
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(
                f"InternLMConfig.chat_template is {self.chat_template!r}; expected one of {tuple(CHAT_TEMPLATES)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"InternLMConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """As transformers', with the RoPE keys of the current `rotary`."""
        return {**super().to_dict(), **rope_keys(self.rotary)}

    def to_diff_dict(self) -> dict:
        """What save_pretrained writes: the RoPE keys even where they equal the defaults (a reader must not have to
        know evods' defaults), and the dtype under both names: transformers 5 reads `dtype`, 4.x `torch_dtype`.
        (Not in `to_dict`: transformers 5 reads every key of it back as an attribute, and warns on `torch_dtype`.)"""
        output = {**super().to_diff_dict(), **rope_keys(self.rotary)}
        dtype = output.get("dtype", output.get("torch_dtype"))
        if dtype is not None:
            output["dtype"] = output["torch_dtype"] = dtype
        return output


__all__ = ["InternLMConfig", "rope_keys"]
