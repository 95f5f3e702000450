"""The configuration of evods' one decoder core, with the field names of InternLM's published Hugging Face config.json.

InternLM v1 is its multi-head case with q/k/v/o biases; grouped-query attention (`num_key_value_heads`), bias-free
projections (`bias=False`) and another RoPE base or scaling make the later families out of the same core.

This file imports only transformers and chat_templates.py and runs under transformers 4.36 to 5.x: `save_pretrained`
copies it next to the weights, so that the folder loads with `trust_remote_code=True` where evods is not installed
(see modeling_internlm.py). That is why it is written in the classic `__init__` style, which every version accepts,
rather than as transformers 5's dataclass fields.
"""
from dataclasses import dataclass

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

from .chat_templates import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE

ROTARY_TYPES = ("origin", "dynamic", "linear", "llama3")
PACKED_ATTENTION_BACKENDS = ("auto", "flash", "varlen", "flex", "loop", "mask")
# HF's rope_scaling types (key "type", or "rope_type" since transformers 4.45) -> evods' rotary types
HF_ROPE_SCALING_TYPES = {"default": "origin", "dynamic": "dynamic", "linear": "linear", "llama3": "llama3"}
# the parameters of Llama 3.1's frequency-dependent scaling, under transformers' names (which `rotary` uses too)
LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a model: the one description the model and the exporters read (`config.rope`),
    whichever spelling the config was written in:
    - InternLM v1's `rotary={"base": b, "type": t, "scaling_factor": f}` (f defaults to 1; llama3 adds the keys of
      LLAMA3_KEYS), which is also what config.json stores;
    - InternLM2's, Llama's and transformers' `rope_theta=b` with `rope_scaling=None` (origin) or
      `{"type" | "rope_type": t, "factor": f, ...}`.
    The types compute as transformers' `modeling_rope_utils.py` does:
    - "origin" keeps the base;
    - "dynamic" is dynamic NTK: past max_position_embeddings the base grows with the length, by
      `base * (f * length / max_position_embeddings - (f - 1)) ** (d / (d - 2))`;
    - "linear" divides every frequency by f (positions interpolated f times closer);
    - "llama3" (Llama 3.1 and later) divides by f the frequencies whose wavelength is longer than
      original_max_position_embeddings / low_freq_factor, keeps those shorter than
      original_max_position_embeddings / high_freq_factor, and blends the two in between.
    Another kind of scaling is another `type` (in ROTARY_TYPES and HF_ROPE_SCALING_TYPES) with its parameters as
    fields here.
    """

    base: float = 10000.0
    type: str = "origin"
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.type not in ROTARY_TYPES:
            raise ValueError(f"RoPE type {self.type!r} is not supported; use one of {ROTARY_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor {self.factor} must be positive")
        llama3 = {key: getattr(self, key) for key in LLAMA3_KEYS}
        if self.type != "llama3" and any(value is not None for value in llama3.values()):
            raise ValueError(f"{', '.join(k for k, v in llama3.items() if v is not None)} belong to RoPE type "
                             f"'llama3', not {self.type!r}")
        if self.type == "llama3":
            missing = [key for key, value in llama3.items() if value is None]
            if missing:
                raise ValueError(f"RoPE type 'llama3' needs factor, {', '.join(LLAMA3_KEYS)}; {missing} missing")
            if self.high_freq_factor <= self.low_freq_factor or self.low_freq_factor <= 0:
                raise ValueError(f"RoPE type 'llama3' needs 0 < low_freq_factor < high_freq_factor, not "
                                 f"{self.low_freq_factor} and {self.high_freq_factor}")
            if self.original_max_position_embeddings <= 0:
                raise ValueError("RoPE type 'llama3' needs a positive original_max_position_embeddings, not "
                                 f"{self.original_max_position_embeddings}")

    @classmethod
    def from_rotary(cls, rotary: dict) -> "Rope":
        return cls(float(rotary["base"]), rotary.get("type"), float(rotary.get("scaling_factor", 1.0)),
                   **_llama3_parameters(rotary))

    @classmethod
    def from_hf(cls, rope_theta: float | None, rope_scaling: dict | None) -> "Rope":
        base = float(rope_theta if rope_theta is not None else 10000.0)
        if not rope_scaling:
            return cls(base)
        hf_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if hf_type not in HF_ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type {hf_type!r} is not supported; use one of "
                             f"{tuple(HF_ROPE_SCALING_TYPES)} (or no rope_scaling)")
        return cls(base, HF_ROPE_SCALING_TYPES[hf_type], float(rope_scaling.get("factor", 1.0)),
                   **_llama3_parameters(rope_scaling))

    @property
    def llama3_parameters(self) -> dict:
        return {key: getattr(self, key) for key in LLAMA3_KEYS} if self.type == "llama3" else {}

    def as_rotary(self) -> dict:
        """InternLM v1's spelling, as config.json stores it (the factor with the types that read it)."""
        rotary = {"base": self.base, "type": self.type}
        return rotary if self.type == "origin" else {**rotary, "scaling_factor": self.factor, **self.llama3_parameters}


def _llama3_parameters(spelling: dict) -> dict:
    """The llama3 keys present in a `rotary` or `rope_scaling` dict, as numbers."""
    kinds = {"low_freq_factor": float, "high_freq_factor": float, "original_max_position_embeddings": int}
    return {key: kinds[key](spelling[key]) for key in LLAMA3_KEYS if spelling.get(key) is not None}


def rope_keys(rotary: dict) -> dict:
    """InternEvo's `rotary` as the RoPE keys that other code reads from config.json: `rope_theta` and `rope_scaling`
    (transformers 4.x's Llama schema, read by vLLM's and SGLang's Llama code and by LMDeploy) and `rope_parameters`
    (transformers 5.x's). Their "dynamic", "linear" and "llama3" compute what evods' do (see `Rope`); `Rope.from_hf`
    reads them back.

    `rope_scaling` of "dynamic" and "linear" holds exactly `type` and `factor`, the only form transformers 4.36 accepts
    (it also requires a factor above 1, so a factor-1 "dynamic" is readable as such from transformers 4.43 on);
    "llama3" is spelled as Llama 3.1's published config.json does (`rope_type`, which transformers reads from 4.43).
    """
    rope = Rope.from_rotary(rotary)
    if rope.type == "origin":
        return {"rope_theta": rope.base, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": rope.base}}
    if rope.type == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": rope.factor, **rope.llama3_parameters}
    else:
        rope_scaling = {"type": rope.type, "factor": rope.factor}
    return {"rope_theta": rope.base, "rope_scaling": rope_scaling,
            "rope_parameters": {"rope_type": rope.type, "factor": rope.factor, **rope.llama3_parameters,
                                "rope_theta": rope.base}}


class InternLMConfig(PreTrainedConfig):
    r"""Configuration of a decoder of InternLM's layout (LLaMA's, rotate-half RoPE, SwiGLU, fp32 RMSNorm); InternLM v1
    by default.

    `num_key_value_heads` (default: `num_attention_heads`) is the number of key/value heads, each shared by
    `num_attention_heads / num_key_value_heads` query heads (grouped-query attention; InternEvo's
    `num_kv_attention_heads`).

    `bias` puts biases on q/k/v/o (InternLM v1); False is the bias-free layout of InternEvo's `no_bias=True`.

    The RoPE is given as `rotary={"base": float, "type": "origin" | "dynamic", "scaling_factor": float}` (InternLM
    v1; what config.json stores) or, without `rotary`, as `rope_theta` with `rope_scaling` (InternLM2, transformers 4)
    or `rope_parameters` (transformers 5), which become `rotary`; `config.rope` reads it (see `Rope`). "dynamic"
    rescales the RoPE base (dynamic NTK) once the sequence is longer than `max_position_embeddings`; "origin" never
    does.

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

    `rope_theta`, `rope_scaling` and `rope_parameters` (see `rope_keys`) are then derived from `rotary`: saved configs
    carry them, serving engines read them off the loaded config, and beside a `rotary` their values in a config.json
    are not read.
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
        chat_template=DEFAULT_CHAT_TEMPLATE,
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
        self.rotary = self._rotary(rotary, rope_theta, rope_scaling, kwargs.pop("rope_parameters", None))
        self.packed_attention = packed_attention
        self.chat_template = chat_template
        self._check()
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

    @staticmethod
    def _rotary(rotary: dict | None, rope_theta: float | None, rope_scaling: dict | None,
                rope_parameters: dict | None) -> dict:
        """`rotary` where given (the HF keys beside it are derived from it, see `rope_keys`); else the HF keys
        (transformers 4's `rope_theta` and `rope_scaling`, or 5's `rope_parameters`); else InternEvo's HF default."""
        if rotary is not None:
            return rotary
        if rope_theta is None and rope_scaling is None and rope_parameters is None:
            return {"base": 10000, "type": "dynamic"}
        if rope_theta is None and rope_parameters is not None:
            rope_theta = rope_parameters.get("rope_theta")
        return Rope.from_hf(rope_theta, rope_scaling or rope_parameters).as_rotary()

    def _check(self) -> None:
        try:
            Rope.from_rotary(self.rotary)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"InternLMConfig.rotary={self.rotary} is not a RoPE: {error}; give "
                             f'{{"base": float, "type": one of {ROTARY_TYPES}, "scaling_factor": float}} (llama3: '
                             f'with {", ".join(LLAMA3_KEYS)})') from None
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

    @property
    def rope(self) -> Rope:
        return Rope.from_rotary(self.rotary)

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


__all__ = ["InternLMConfig", "Rope", "rope_keys"]
