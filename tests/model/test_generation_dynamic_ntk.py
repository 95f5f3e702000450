"""Generation with a KV cache and dynamic NTK RoPE past max_position_embeddings (issue: exported models): every step
rotates all keys, cached ones included, with the current length's base, as InternLM's published HF code does; below
that length, and with origin RoPE, the cached keys are not rotated again. Tiny fp32 models on CPU."""
import pytest
import torch

from evods.model.modeling_internlm import CachedKeysRotation, rotate_half
from tests.model.test_model import make_model

torch.set_num_threads(1)

MAX_POS = 16
NEW_TOKENS = 20
ROTARIES = {"dynamic": {"base": 10000, "type": "dynamic"},
            "scaled": {"base": 10000, "type": "dynamic", "scaling_factor": 2.0}}
CASES = [pytest.param(ROTARIES[rotary], prompt_len, padded, id=f"{rotary}-prompt{prompt_len}-{batch}")
         for rotary in ROTARIES for prompt_len in (6, 24) for padded, batch in ((False, "batch1"), (True, "padded"))]


def prompt(prompt_len: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One row, or two with the second left-padded by 4."""
    ids = torch.randint(3, 97, (2 if padded else 1, prompt_len), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def cached_generation(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, their attention mask, the logits of each generated token [steps, B, V]) of greedy `generate`."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, use_cache=True, output_logits=True,
                         return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(len(ids), NEW_TOKENS, dtype=mask.dtype)], dim=1)
    return out.sequences, full_mask, torch.stack(out.logits)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def uncached_logits(model, sequences, mask, prompt_len) -> torch.Tensor:
    """The last logits of a full forward without a cache, for every generated token."""
    return torch.stack([model(sequences[:, :end], attention_mask=mask[:, :end], position_ids=positions(mask[:, :end]),
                              use_cache=False).logits[:, -1]
                        for end in range(prompt_len, prompt_len + NEW_TOKENS)])


@torch.no_grad()
def published_algorithm_logits(model, sequences, mask, prompt_len) -> torch.Tensor:
    """InternLM's published HF code with a cache (InternEvo's transformers/internlm_model/modeling_internlm.py),
    written out on the model's weights: each layer caches its keys un-rotated; every step rotates all of them with the
    base of the current total length, at the positions counted along the attention mask; eager attention."""
    inner = model.model
    rotary, heads, head_dim = inner.rotary_emb, model.config.num_attention_heads, model.config.head_dim
    keys, values, logits = [None] * len(inner.layers), [None] * len(inner.layers), []
    steps = [(0, prompt_len)] + [(end - 1, end) for end in range(prompt_len + 1, prompt_len + NEW_TOKENS)]
    for start, end in steps:
        cos, sin = rotary.tables(positions(mask[:, :end]), rotary.base_for_length(end))
        causal = torch.ones(end - start, end, dtype=torch.bool).tril(diagonal=start)
        allowed = causal[None, None] & mask[:, None, None, :end].bool()
        hidden = inner.embed_tokens(sequences[:, start:end])
        for i, layer in enumerate(inner.layers):
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q, k, v = (proj(x).unflatten(-1, (heads, head_dim)).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # [B, H, T, D]
            keys[i] = k if start == 0 else torch.cat([keys[i], k], dim=2)
            values[i] = v if start == 0 else torch.cat([values[i], v], dim=2)
            q_cos, q_sin = cos[:, None, start:end], sin[:, None, start:end]
            q = q * q_cos + rotate_half(q) * q_sin
            k_all = keys[i] * cos[:, None] + rotate_half(keys[i]) * sin[:, None]
            scores = (q @ k_all.transpose(2, 3)) / head_dim**0.5
            weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
            out = (weights @ values[i]).transpose(1, 2).flatten(2)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits.append(model.lm_head(inner.norm(hidden))[:, -1])
    return torch.stack(logits)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("rotary, prompt_len, padded", CASES)
def test_cached_generation_equals_uncached_across_max_position_embeddings(rotary, prompt_len, padded):
    # One layer: its keys and values come from the embeddings alone, so a cache that rotates every key with the
    # current base computes exactly what a full forward does at every step.
    model = make_model(num_hidden_layers=1, rotary=rotary, max_position_embeddings=MAX_POS)
    sequences, mask, logits = cached_generation(model, *prompt(prompt_len, padded))
    assert sequences.shape[1] == prompt_len + NEW_TOKENS > MAX_POS
    assert max_abs_diff(logits, uncached_logits(model, sequences, mask, prompt_len)) <= 1e-5


@pytest.mark.parametrize("rotary, prompt_len, padded", CASES)
def test_cached_generation_of_a_deep_model_is_internlms_published_algorithm(rotary, prompt_len, padded):
    # With more layers, the hidden states behind cached keys and values were computed under the bases of earlier,
    # shorter lengths, so no cache equals a full forward past max_position_embeddings; InternLM's published code
    # differs from its own uncached forward the same way. Its cached algorithm is the reference.
    model = make_model(num_hidden_layers=3, rotary=rotary, max_position_embeddings=MAX_POS)
    sequences, mask, logits = cached_generation(model, *prompt(prompt_len, padded))
    assert max_abs_diff(logits, published_algorithm_logits(model, sequences, mask, prompt_len)) <= 1e-5


@pytest.mark.parametrize("rotary, rotations", [({"base": 10000, "type": "origin"}, 0),
                                               ({"base": 10000, "type": "dynamic"}, 6 + NEW_TOKENS - 1 - MAX_POS)])
def test_cached_keys_are_rotated_again_only_once_the_base_changes(monkeypatch, rotary, rotations):
    calls = []
    for_step = CachedKeysRotation.for_step.__func__
    monkeypatch.setattr(CachedKeysRotation, "for_step",
                        classmethod(lambda cls, *args: calls.append(args[-1]) or for_step(cls, *args)))
    model = make_model(num_hidden_layers=2, rotary=rotary, max_position_embeddings=MAX_POS)
    cached_generation(model, *prompt(6, padded=False))
    # a 6-token prompt and 20 new tokens: the steps whose total length passes 16 (the last new token is never fed);
    # each call gets the number of cached tokens
    assert len(calls) == rotations and calls == list(range(MAX_POS, MAX_POS + rotations))
