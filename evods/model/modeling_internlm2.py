"""InternLM's published InternLM2 model (`InternLM2ForCausalLM`) as evods' one decoder core under the published
parameter names, so that a folder evods exports is a drop-in for InternLM's (same key names, config keys and chat
template) and a published folder loads here with `trust_remote_code=True`.

The computation is modeling_internlm.py's; this file only names its parts as InternLM's published code does:
`model.tok_embeddings`, `model.layers.N.attention.wqkv` (q/k/v in one projection whose rows are grouped by KV head:
each group's query heads, then its key head, then its value head), `attention.wo`, `feed_forward.w1/w3/w2` (gate, up,
down), `attention_norm`, `ffn_norm`, `model.norm` and `output`. Like modeling_internlm.py it imports only torch,
transformers and its sibling files, because `save_pretrained` copies it into exported folders.
"""
import torch
from torch import nn

# transformers 4.36 copies into its module cache only the files a remote module imports itself (`from .name import`
# lines), not theirs: the core's own three are imported here so that they come along.
from .chat_templates import CHAT_TEMPLATES  # noqa: F401
from .configuration_internlm import InternLMConfig  # noqa: F401
from .configuration_internlm2 import InternLM2Config
from .modeling_internlm import (
    InternLMAttention,
    InternLMDecoderLayer,
    InternLMForCausalLM,
    InternLMMLP,
    InternLMModel,
)
from .transformers_compat import CACHE_NAME  # noqa: F401


class PublishedNames:
    """A module whose children the core calls `name` are stored as `renames[name]`: the core's code runs unchanged
    and the state dict carries InternLM's published names."""

    renames: dict[str, str] = {}

    def __setattr__(self, name, value):
        super().__setattr__(self.renames.get(name, name), value)

    def __getattr__(self, name):
        return super().__getattr__(self.renames.get(name, name))

    def __delattr__(self, name):
        super().__delattr__(self.renames.get(name, name))


class InternLM2Attention(PublishedNames, InternLMAttention):
    renames = {"o_proj": "wo"}

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, rows, bias=config.bias)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups = self.wqkv(hidden_states).unflatten(-1, (-1, self.num_key_value_groups + 2, self.head_dim))
        q = groups[..., :-2, :].flatten(-3, -2)  # [B, T, KV, q_per_kv, D] -> [B, T, H, D]
        return q, groups[..., -2, :], groups[..., -1, :]


class InternLM2MLP(PublishedNames, InternLMMLP):
    renames = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class InternLM2DecoderLayer(PublishedNames, InternLMDecoderLayer):
    renames = {"self_attn": "attention", "mlp": "feed_forward", "input_layernorm": "attention_norm",
               "post_attention_layernorm": "ffn_norm"}
    attention_class, mlp_class = InternLM2Attention, InternLM2MLP


class InternLM2Model(PublishedNames, InternLMModel):
    config_class = InternLM2Config
    _no_split_modules = ["InternLM2DecoderLayer"]
    renames = {"embed_tokens": "tok_embeddings"}
    decoder_layer_class = InternLM2DecoderLayer


class InternLM2ForCausalLM(PublishedNames, InternLMForCausalLM):
    config_class = InternLM2Config
    _no_split_modules = ["InternLM2DecoderLayer"]
    renames = {"lm_head": "output"}
    base_model_class = InternLM2Model


__all__ = ["InternLM2ForCausalLM", "InternLM2Model"]
