"""What the InternLM model takes from transformers, for every version from 4.36 to 5.x.

modeling_internlm.py is evods' model and also the remote code of exported folders: `save_pretrained` copies it,
configuration_internlm.py and this file next to the weights, and the serving and evaluation stacks that load them pin
anything from transformers 4.36 on. The model imports what differs between versions from here only:
- transformers 5 names the KV cache `cache` (argument and output field), 4.x `past_key_values`;
- transformers 5 builds the attention mask for whichever `attn_implementation` was chosen (`create_causal_mask` and
  its attention functions); before, this file builds the mask for SDPA or eager attention itself;
- before 4.45, `generate` needs the model's own `prepare_inputs_for_generation`;
- transformers 5 creates models on the meta device and refills non-persistent buffers through `_init_weights` with
  its `initialization` helpers, which leave tensors loaded from the checkpoint alone;
- `loss_function` exists since 4.46;
- tied weights are named by a mapping in transformers 5, by a list before.
"""

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    TRANSFORMERS_BUILDS_MASKS = "cache" in inspect.signature(create_causal_mask).parameters
except ImportError:
    TRANSFORMERS_BUILDS_MASKS = False

try:
    from transformers.initialization import copy_ as init_copy_
except ImportError:  # transformers 4 builds the model on a real device: a plain copy is right

    def init_copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tensor.copy_(other)


CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
GENERATION_PREPARES_INPUTS = "input_ids" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
# lm_head's weight is the input embedding's where config.tie_word_embeddings (Llama-3.2 1B/3B): transformers 5 reads the
# tied weights as a {target: source} mapping, 4.x as a list of targets
TIED_HEAD_KEYS = {"lm_head.weight": "model.embed_tokens.weight"} if "get_expanded_tied_weights_keys" in dir(
    PreTrainedModel) else ["lm_head.weight"]


def new_cache(config) -> DynamicCache:
    return DynamicCache(config=config) if "config" in inspect.signature(DynamicCache).parameters else DynamicCache()


def build_causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache, past_len: int,
                position_ids: torch.Tensor):
    """The attention mask for a padded batch or a cached step, in the form `attention_function` expects."""
    if TRANSFORMERS_BUILDS_MASKS:
        return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
    # bool [B, 1, T, past + T]: causal, and no padded key
    query_len = inputs_embeds.shape[1]
    key_len = past_len + query_len
    mask = torch.ones(query_len, key_len, dtype=torch.bool, device=inputs_embeds.device).tril(diagonal=past_len)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool()
    # A left-padding query sees no key; letting it see all keeps its (unused) output finite instead of NaN, which
    # would reach the other rows through the values of the padded positions.
    return mask | ~mask.any(dim=-1, keepdim=True)


def attention_function(implementation: str):
    """fn(module, query, key, value, mask, scaling, dropout) -> ([B, T, H, D], weights), inputs [B, H, T, D]."""
    if TRANSFORMERS_BUILDS_MASKS:
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return eager_attention_forward if implementation == "eager" else sdpa_attention_forward


def repeat_kv_heads(x: torch.Tensor, query_heads: int) -> torch.Tensor:
    """[B, KV, T, D] -> [B, query_heads, T, D], query head h reading KV head h // (query_heads / KV) (grouped-query
    attention); what transformers' `repeat_kv` does, for the paths where the kernel cannot take fewer KV heads."""
    groups = query_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention for `attn_implementation="eager"` (additive or bool mask); key and value may have fewer
    heads than query (grouped-query attention)."""
    key, value = (repeat_kv_heads(x, query.shape[1]) for x in (key, value))
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    elif attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # the KV heads repeated: SDPA's `enable_gqa` needs torch 2.5, and transformers 4 runs on older ones
    key, value = (repeat_kv_heads(x, query.shape[1]) for x in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


def legacy_prepare_inputs_for_generation(model, input_ids, past_key_values=None, attention_mask=None,
                                         inputs_embeds=None, use_cache=None, **kwargs) -> dict:
    """transformers < 4.45: the tokens not in the cache yet, at positions counted along the attention mask (a padded
    position gets 0; it is masked)."""
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    input_ids = input_ids[:, past_len:]
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None and past_len == 0 else \
        {"input_ids": input_ids}
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    return {**inputs, "position_ids": position_ids, "attention_mask": attention_mask, "use_cache": use_cache,
            CACHE_NAME: past_key_values}


def causal_lm_loss(model, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs) -> torch.Tensor:
    """transformers' causal LM loss (labels unshifted, -100 ignored); its own function where it has one."""
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not None:
        return loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
    shifted_logits = logits[:, :-1].reshape(-1, vocab_size).float()
    return F.cross_entropy(shifted_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
