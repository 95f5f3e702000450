"""The configuration of InternLM's published InternLM2 Hugging Face folders (`"model_type": "internlm2"`, class
`InternLM2Config`): evods' one decoder configuration under the published keys and defaults.

Like configuration_internlm.py it imports only transformers (and that file), because `save_pretrained` copies it into
exported folders, which load with `trust_remote_code=True` where evods is not installed (transformers 4.36 to 5.x).
"""
from .chat_templates import INTERNLM2
from .configuration_internlm import InternLMConfig


class InternLM2Config(InternLMConfig):
    r"""`InternLMConfig` with the published InternLM2 defaults (q/k/v/o biases unless `bias=False`, plain RoPE of base
    `rope_theta` unless `rope_scaling={"type": "dynamic", "factor": f}`, InternLM2's ChatML chat template) and keys.

    `attn_implementation`: the published code's choice, "eager" (its own attention) or "flash_attention_2". "eager" is
    read as transformers' default (SDPA, the same attention faster); other values are transformers' own choice.
    `pretraining_tp` is accepted and has no effect (the published code also ignores it for these weights).
    """

    model_type = "internlm2"

    def __init__(self, bias=True, rope_theta=10000, rope_scaling=None, attn_implementation=None, pretraining_tp=1,
                 chat_template=INTERNLM2.name, **kwargs):
        self.pretraining_tp = pretraining_tp
        if attn_implementation not in (None, "eager"):
            kwargs["attn_implementation"] = attn_implementation
        super().__init__(bias=bias, rope_theta=rope_theta, rope_scaling=rope_scaling, chat_template=chat_template,
                         **kwargs)

    def to_diff_dict(self) -> dict:
        """What save_pretrained writes: as InternLMConfig, with the published code's `attn_implementation` (eager
        unless flash-attn was chosen), which it requires."""
        implementation = getattr(self, "_attn_implementation_internal", None)
        return {**super().to_diff_dict(),
                "attn_implementation": "flash_attention_2" if implementation == "flash_attention_2" else "eager"}


__all__ = ["InternLM2Config"]
