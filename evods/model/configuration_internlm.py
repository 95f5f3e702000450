"""InternLM (v1) configuration, with the field names of InternLM's published Hugging Face config.json.

This file imports only transformers: `save_pretrained` copies it next to the weights so that the folder also loads
with `trust_remote_code=True` where evods is not installed.
"""

from transformers import PreTrainedConfig

ROTARY_TYPES = ("origin", "dynamic")
PACKED_ATTENTION_BACKENDS = ("auto", "flash", "varlen", "flex", "loop", "mask")


class InternLMConfig(PreTrainedConfig):
    r"""Configuration of an InternLM v1 model (LLaMA layout with bias on q/k/v/o, rotate-half RoPE, SwiGLU).

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
    "flash_attention_2", ...) with transformers' masks instead.
    """

    model_type = "internlm"

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rotary: dict | None = None
    packed_attention: str = "auto"

    def __post_init__(self, **kwargs):
        if self.rotary is None:
            self.rotary = {"base": 10000, "type": "dynamic"}  # InternEvo's HF default; scaling_factor defaults to 1
        if self.rotary.get("type") not in ROTARY_TYPES:
            raise ValueError(
                f"InternLMConfig.rotary['type'] is {self.rotary.get('type')!r}; expected one of {ROTARY_TYPES}."
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
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["InternLMConfig"]
