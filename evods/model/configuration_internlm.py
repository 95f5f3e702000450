"""The configuration of evods' one decoder core, with the field names of InternLM's published Hugging Face config.json.

InternLM v1 is its multi-head case with q/k/v/o biases; grouped-query attention (`num_key_value_heads`), bias-free
projections (`bias=False`) and another RoPE base or scaling make the later families out of the same core.

This file imports only transformers and runs under transformers 4.36 to 5.x: `save_pretrained` copies it next to the
weights, so that the folder loads with `trust_remote_code=True` where evods is not installed (see modeling_internlm.py).
That is why it is written in the classic `__init__` style, which every version accepts, rather than as transformers
5's dataclass fields.
"""
from dataclasses import dataclass

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

ROTARY_TYPES = ("origin", "dynamic")
PACKED_ATTENTION_BACKENDS = ("auto", "flash", "varlen", "flex", "loop", "mask")
# HF's rope_scaling types (key "type", or "rope_type" since transformers 4.45) -> evods' rotary types
HF_ROPE_SCALING_TYPES = {"default": "origin", "dynamic": "dynamic"}


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a model: the one description the model and the exporters read (`config.rope`),
    whichever spelling the config was written in:
    - InternLM v1's `rotary={"base": b, "type": "origin" | "dynamic", "scaling_factor": f}` (f defaults to 1), which
      is also what config.json stores;
    - InternLM2's and transformers' `rope_theta=b` with `rope_scaling=None` (origin) or
      `{"type": "dynamic", "factor": f}`.
    "origin" keeps the base; "dynamic" is dynamic NTK: past max_position_embeddings the base grows with the length,
    by `base * (f * length / max_position_embeddings - (f - 1)) ** (d / (d - 2))`. Another kind of scaling is
    another `type` (in ROTARY_TYPES and HF_ROPE_SCALING_TYPES) with its parameters as fields here.
    """

    base: float = 10000.0
    type: str = "origin"
    factor: float = 1.0

    def __post_init__(self):
        if self.type not in ROTARY_TYPES:
            raise ValueError(f"RoPE type {self.type!r} is not supported; use one of {ROTARY_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor {self.factor} must be positive")

    @classmethod
    def from_rotary(cls, rotary: dict) -> "Rope":
        return cls(float(rotary["base"]), rotary.get("type"), float(rotary.get("scaling_factor", 1.0)))

    @classmethod
    def from_hf(cls, rope_theta: float | None, rope_scaling: dict | None) -> "Rope":
        base = float(rope_theta if rope_theta is not None else 10000.0)
        if not rope_scaling:
            return cls(base)
        hf_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if hf_type not in HF_ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type {hf_type!r} is not supported; use one of "
                             f"{tuple(HF_ROPE_SCALING_TYPES)} (or no rope_scaling)")
        return cls(base, HF_ROPE_SCALING_TYPES[hf_type], float(rope_scaling.get("factor", 1.0)))

    def as_rotary(self) -> dict:
        """InternLM v1's spelling, as config.json stores it (the factor with the type that reads it)."""
        rotary = {"base": self.base, "type": self.type}
        return {**rotary, "scaling_factor": self.factor} if self.type == "dynamic" else rotary


class InternLMConfig(PreTrainedConfig):
    r"""Configuration of a decoder of InternLM's layout (LLaMA's, rotate-half RoPE, SwiGLU, fp32 RMSNorm); InternLM v1
    by default.

    `num_key_value_heads` (default: `num_attention_heads`) is the number of key/value heads, each shared by
    `num_attention_heads / num_key_value_heads` query heads (grouped-query attention; InternEvo's
    `num_kv_attention_heads`).

    `bias` puts biases on q/k/v/o (InternLM v1); False is the bias-free layout of InternEvo's `no_bias=True`.

    The RoPE is given either as `rotary={"base": float, "type": "origin" | "dynamic", "scaling_factor": float}`
    (InternLM v1) or as `rope_theta` and `rope_scaling` (InternLM2, transformers); both become `rotary`, which
    config.json stores, and `config.rope` reads it (see `Rope`). "dynamic" rescales the RoPE base (dynamic NTK) once
    the sequence is longer than `max_position_embeddings`; "origin" never does.

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
    """

    model_type = "internlm"

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
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
        rope_theta=None,
        rope_scaling=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rotary = self._rotary(rotary, rope_theta, rope_scaling)
        self.packed_attention = packed_attention
        self._check()
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @staticmethod
    def _rotary(rotary: dict | None, rope_theta: float | None, rope_scaling: dict | None) -> dict:
        """The `rotary` dict of either spelling; given both (a folder that carries both, for other readers), they must
        agree."""
        if rope_theta is None and rope_scaling is None:
            return rotary if rotary is not None else {"base": 10000, "type": "dynamic"}  # InternEvo's HF default
        hf_rope = Rope.from_hf(rope_theta, rope_scaling)
        if rotary is not None and Rope.from_rotary(rotary) != hf_rope:
            raise ValueError(f"InternLMConfig: rotary={rotary} and rope_theta={rope_theta}, "
                             f"rope_scaling={rope_scaling} describe different RoPEs; give one of them")
        return rotary if rotary is not None else hf_rope.as_rotary()

    def _check(self) -> None:
        try:
            Rope.from_rotary(self.rotary)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"InternLMConfig.rotary={self.rotary} is not a RoPE: {error}; give "
                             '{"base": float, "type": "origin" | "dynamic", "scaling_factor": float}') from None
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"InternLMConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}): each KV head serves an equal group of query heads."
            )
        if self.packed_attention not in PACKED_ATTENTION_BACKENDS:
            raise ValueError(
                f"InternLMConfig.packed_attention is {self.packed_attention!r}; "
                f"expected one of {PACKED_ATTENTION_BACKENDS}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"InternLMConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope(self) -> Rope:
        return Rope.from_rotary(self.rotary)

    def to_diff_dict(self) -> dict:
        """What save_pretrained writes, with the dtype under both names: transformers 5 reads `dtype`, 4.x
        `torch_dtype`. (Not in `to_dict`: transformers 5 reads every key of it back as an attribute, and warns on
        `torch_dtype`.)"""
        output = super().to_diff_dict()
        dtype = output.get("dtype", output.get("torch_dtype"))
        if dtype is not None:
            output["dtype"] = output["torch_dtype"] = dtype
        return output


__all__ = ["InternLMConfig", "Rope"]
