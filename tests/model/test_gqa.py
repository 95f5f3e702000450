"""Grouped-query attention and the RoPE of the later families in the one model core: a model with fewer KV heads
computes what the multi-head model with each KV head copied to its query heads computes, in every CPU attention
path (packed backends, padded batches, generation with a cache, past max_position_embeddings with dynamic NTK); the
CUDA kernels get the KV heads in the form they take; the config reads both RoPE spellings; the head split that
tensor parallelism uses. Tiny fp32 models on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from evods.model import HeadSplit, InternLMConfig, InternLMForCausalLM, Rope
from evods.model import modeling_internlm as modeling
from tests.model.test_model import assert_close_rel, make_model, packed_row

torch.set_num_threads(1)

HEADS, KV_HEADS = 4, 2
MAX_POS = 16
GQA = dict(num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
           rotary={"base": 1e6, "type": "dynamic", "scaling_factor": 2.0})


def expanded_twin(model: InternLMForCausalLM) -> InternLMForCausalLM:
    """The multi-head model whose k/v heads are the grouped model's, each copied to the query heads that use it."""
    config = InternLMConfig.from_dict({**model.config.to_dict(), "num_key_value_heads": HEADS})
    twin = InternLMForCausalLM(config).eval()
    groups = HEADS // model.config.num_key_value_heads
    state = {}
    for name, tensor in model.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:  # rows: KV heads of head_dim rows each
            tensor = tensor.unflatten(0, (model.config.num_key_value_heads, -1)).repeat_interleave(groups, 0)
            tensor = tensor.flatten(0, 1)
        state[name] = tensor
    twin.load_state_dict(state)
    return twin


@pytest.fixture(scope="module")
def pair():
    model = make_model(**GQA)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (KV_HEADS * 8, 32)
    return model, expanded_twin(model)


@pytest.mark.parametrize("backend", ["loop", "mask", "flex"])  # flex: forward only on CPU
def test_packed_rows_equal_the_expanded_model_in_every_cpu_backend(pair, backend):
    model, twin = pair
    generator = torch.Generator().manual_seed(1)
    rows = [packed_row(lengths, 97, generator) for lengths in ([5, 1, 7, 3, 1, 7], [10, 6, 2, 6])]
    ids, positions = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    long_ids = torch.randint(0, 97, (1, 2 * MAX_POS), generator=generator)  # one document past max_position_embeddings
    for module in (model, twin):
        module.config.packed_attention = backend
    try:
        with torch.no_grad():
            assert_close_rel(model(ids, position_ids=positions).logits, twin(ids, position_ids=positions).logits)
            assert_close_rel(model(long_ids).logits, twin(long_ids).logits)
    finally:
        for module in (model, twin):
            module.config.packed_attention = "auto"


@pytest.mark.parametrize("backend", ["loop", "mask"])
def test_a_torch_without_enable_gqa_gets_the_kv_heads_repeated(pair, backend, monkeypatch):
    """An exported model may run on torch < 2.5, whose SDPA has no `enable_gqa`."""
    model, twin = pair
    monkeypatch.setattr(modeling, "SDPA_TAKES_GQA", False)
    monkeypatch.setattr(model.config, "packed_attention", backend)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(kwargs) or sdpa(*args, **kwargs))
    ids, positions = packed_row([5, 11], 97, torch.Generator().manual_seed(5))
    with torch.no_grad():
        grouped = model(ids[None], position_ids=positions[None]).logits
    monkeypatch.undo()
    assert calls and not any("enable_gqa" in kwargs for kwargs in calls)
    with torch.no_grad():
        assert_close_rel(grouped, twin(ids[None], position_ids=positions[None]).logits)


def test_packed_backward_equals_the_expanded_model(pair):
    """The gradient of a KV head is the sum of the gradients of its copies in the multi-head model."""
    model, twin = pair
    generator = torch.Generator().manual_seed(2)
    ids, positions = packed_row([4, 9, 1, 6], 97, generator)
    grads = {}
    for name, module in (("grouped", model), ("expanded", twin)):
        module.zero_grad()
        module(ids[None], position_ids=positions[None]).logits.square().mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad()
    for name, grad in grads["grouped"].items():
        expected = grads["expanded"][name]
        if ".k_proj." in name or ".v_proj." in name:  # sum the copies of each KV head
            expected = expected.unflatten(0, (KV_HEADS, HEADS // KV_HEADS, -1)).sum(1).flatten(0, 1)
        assert_close_rel(grad, expected)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padded_batch_equals_the_expanded_model(pair, implementation):
    model, twin = pair
    ids = torch.randint(0, 97, (3, 2 * MAX_POS))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 20:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outputs = []
    for module in (model, twin):
        module.config._attn_implementation = implementation
        with torch.no_grad():
            outputs.append(module(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits)
        module.config._attn_implementation = "sdpa"
    assert_close_rel(outputs[0][mask.bool()], outputs[1][mask.bool()])


@pytest.mark.parametrize("padded", [False, True])
def test_generation_with_a_cache_equals_the_expanded_model_past_max_position_embeddings(pair, padded):
    """The cache holds the KV heads only, and the dynamic-NTK re-rotation of the cached keys works on them."""
    model, twin = pair
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :3], mask[1, :3] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=2 * MAX_POS, min_new_tokens=2 * MAX_POS, do_sample=False,
                  pad_token_id=0, use_cache=True, output_logits=True, return_dict_in_generate=True)
    grouped, expanded = model.generate(ids, **kwargs), twin.generate(ids, **kwargs)
    assert grouped.sequences.shape[1] == 6 + 2 * MAX_POS
    assert_close_rel(torch.stack(grouped.logits), torch.stack(expanded.logits))
    assert torch.equal(grouped.sequences, expanded.sequences)
    keys = grouped.past_key_values.layers[0].keys if hasattr(grouped.past_key_values, "layers") \
        else grouped.past_key_values.key_cache[0]
    assert keys.shape == (2, KV_HEADS, 6 + 2 * MAX_POS - 1, 8)  # [B, KV heads, cached tokens, head_dim]


def varlen_reference(q, k, v, cu_seqlens, scale):
    """Causal attention per document of flattened tokens, query head h reading KV head h // (H / KV): what flash-attn
    and torch's varlen kernel compute with fewer KV heads (their documented GQA)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_doc, k_doc, v_doc = (x[start:end].float().transpose(0, 1) for x in (q, k, v))  # [heads, T, D]
        k_doc, v_doc = (x.repeat_interleave(groups, 0) for x in (k_doc, v_doc))
        scores = (q_doc @ k_doc.transpose(1, 2)) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        out[start:end] = (scores.masked_fill(~causal, -math.inf).softmax(-1) @ v_doc).transpose(0, 1).to(q.dtype)
    return out


def test_cuda_kernels_get_the_kv_heads_in_the_form_they_take(monkeypatch):
    """flash-attn and torch's varlen kernel run on CUDA only: here they are stand-ins with their documented
    semantics, which record what evods passes them. flash-attn and a varlen with `enable_gqa` get the KV heads as
    they are; a varlen release without it gets them repeated in the order GQA reads them."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 12, HEADS, 8, generator=generator)
    k, v = (torch.randn(2, 12, KV_HEADS, 8, generator=generator) for _ in range(2))
    documents = modeling.PackedDocuments.from_position_ids(torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6],
                                                                         list(range(12))]))
    expected = modeling.packed_attention_mask(*(x.bfloat16().float() for x in (q, k, v)), documents, 8**-0.5)
    seen = {}

    def flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        seen["flash"] = (k.shape[1], causal)
        return varlen_reference(q, k, v, cu_q, softmax_scale)

    def varlen_with_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen["varlen_with_gqa"] = (k.shape[1], enable_gqa, window_size)
        return varlen_reference(q, k, v, cu_q, scale or q.shape[-1] ** -0.5)

    def varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        seen["varlen_without_gqa"] = (k.shape[1], is_causal)
        assert k.shape[1] == q.shape[1], "this release needs as many KV heads as query heads"
        return varlen_reference(q, k, v, cu_q, q.shape[-1] ** -0.5)

    monkeypatch.setattr(modeling, "flash_attn_varlen_func", flash)
    outputs = {"flash": modeling.packed_attention_flash(q, k, v, documents, 8**-0.5)}
    for name, kernel in (("varlen_with_gqa", varlen_with_gqa), ("varlen_without_gqa", varlen_without_gqa)):
        monkeypatch.setattr(modeling, "torch_varlen_attn", kernel)
        outputs[name] = modeling.packed_attention_varlen(q, k, v, documents, 8**-0.5)
    assert seen == {"flash": (KV_HEADS, True), "varlen_with_gqa": (KV_HEADS, True, (-1, 0)),
                    "varlen_without_gqa": (HEADS, True)}
    for name, out in outputs.items():
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2, msg=name)  # the kernels run in bf16


def test_cached_keys_rotation_turns_kv_heads_to_the_current_base():
    """CachedKeysRotation works on the cache's [B, KV, T, D] layout: stored keys turned to the current base equal
    keys rotated with the current base directly."""
    rotary = make_model(**GQA).model.rotary_emb
    positions = torch.arange(20, 24)[None]
    rotation = modeling.CachedKeysRotation.for_step(rotary, positions, past_len=20)
    keys = torch.randn(1, 24, KV_HEADS, 8)
    all_positions = torch.arange(24)[None]
    stored = modeling.apply_rotary(keys, *rotary.tables(all_positions, rotary.base))
    turned = modeling.apply_rotary(stored.transpose(1, 2), *rotation.to_current, heads_dim=1)
    direct = modeling.apply_rotary(keys, *rotary.tables(all_positions, rotary.base_for_length(24)))
    assert rotary.base_for_length(24) != rotary.base
    torch.testing.assert_close(turned, direct.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_rope_in_either_spelling_is_one_description():
    internlm2 = InternLMConfig(rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert internlm2.rope == Rope(1e6, "dynamic", 2.0) == InternLMConfig(rotary=internlm2.rotary).rope
    assert internlm2.rotary == {"base": 1e6, "type": "dynamic", "scaling_factor": 2.0}  # what config.json stores
    assert InternLMConfig(rope_theta=5e7).rope == Rope(5e7, "origin")  # no rope_scaling: the base never changes
    assert InternLMConfig(rope_theta=1e4, rope_scaling={"rope_type": "dynamic", "factor": 2.5}).rope.factor == 2.5
    assert InternLMConfig().rope == Rope(10000, "dynamic")  # InternLM's published v1 default
    assert InternLMConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e7, "factor": 2.5}).rope == \
        Rope(5e7, "dynamic", 2.5)  # transformers 5's spelling
    # evods' exports write `rotary` and the HF keys derived from it: `rotary` is what is read
    beside = InternLMConfig(rotary={"base": 1e4, "type": "origin"}, rope_theta=1e6)
    assert beside.rope == Rope(1e4, "origin") and beside.rope_theta == 1e4
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        InternLMConfig(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 2.0})
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    llama31 = InternLMConfig(rope_theta=5e5, rope_scaling=llama3)  # Llama 3.1's config.json
    assert llama31.rope == Rope(5e5, "llama3", 8.0, 1.0, 4.0, 8192) == InternLMConfig(rotary=llama31.rotary).rope
    assert llama31.to_dict()["rope_scaling"] == llama3
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        InternLMConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    assert InternLMConfig(num_attention_heads=32).num_key_value_heads == 32  # multi-head unless said otherwise


def test_rope_scaling_factor_changes_the_dynamic_base_as_transformers_does():
    """HF's dynamic rope (LlamaForCausalLM) and evods' base growth agree for a factor other than 1."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = make_model(**GQA).model.rotary_emb
    llama = LlamaConfig(hidden_size=32, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](llama, "cpu", seq_len=40)
    torch.testing.assert_close(rotary.inv_freq_for_base(rotary.base_for_length(40)), inv_freq.float())


@pytest.mark.parametrize("heads, kv_heads, parts, kv_of_parts", [
    (8, 8, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # multi-head: each part its own two
    (8, 4, 2, [[0, 1], [2, 3]]),
    (8, 2, 4, [[0], [0], [1], [1]]),  # fewer KV heads than parts: two parts share each
    (4, 1, 2, [[0], [0]]),
])
def test_head_split_gives_each_part_the_kv_heads_its_query_heads_use(heads, kv_heads, parts, kv_of_parts):
    split = HeadSplit(heads, kv_heads, parts)
    assert [list(split.kv_heads(part)) for part in range(parts)] == kv_of_parts
    for part in range(parts):
        query_heads = range(part * heads // parts, (part + 1) * heads // parts)
        assert {h // (heads // kv_heads) for h in query_heads} <= set(split.kv_heads(part))
    assert split.kv_replicas == max(1, parts // kv_heads)


def test_head_split_refusals_name_the_numbers_and_the_sizes_that_fit():
    with pytest.raises(ValueError, match=r"^6 KV heads do not fit 4 parts: .* \(sizes that fit: 1, 2, 3, 6, 12\)$"):
        HeadSplit(12, 6, 4)
    with pytest.raises(ValueError, match=r"^4 query heads do not split into 3 equal parts \(sizes that fit: 1, 2, "
                                         r"4\)$"):
        HeadSplit(4, 4, 3)


def test_eager_and_sdpa_of_transformers_4_repeat_kv_heads_in_gqa_order():
    """The attention functions evods brings for transformers 4 (and eager on 5) take fewer KV heads."""
    from evods.model.transformers_compat import eager_attention_forward, sdpa_attention_forward

    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, HEADS, 5, 8, generator=generator)
    k, v = (torch.randn(2, KV_HEADS, 5, 8, generator=generator) for _ in range(2))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    for attention in (eager_attention_forward, sdpa_attention_forward):
        out, _ = attention(None, q, k, v, mask, scaling=8**-0.5)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
