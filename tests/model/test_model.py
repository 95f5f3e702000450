"""The InternLM model's math: equal to transformers' Llama, packed rows, attention backends, dynamic NTK, activation
checkpointing and input errors. Tiny fp32 models on CPU."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evods.model import InternLMConfig, InternLMForCausalLM, set_activation_checkpointing
from evods.model.modeling_internlm import (
    PackedDocuments,
    auto_packed_attention,
    flash_attn_varlen_func,
    packed_attention_backend,
)
from evods.parallel import pipeline_layers

torch.set_num_threads(1)

SMALL_CONFIGS = [
    dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3),
    dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
         rotary={"base": 500, "type": "origin"}, rms_norm_eps=1e-5),
]


def make_model(seed: int = 0, **overrides) -> InternLMForCausalLM:
    """A tiny model with every parameter random (biases and norm weights included)."""
    torch.manual_seed(seed)
    config = InternLMConfig(**{**SMALL_CONFIGS[0], **overrides})
    model = InternLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def llama_twin(model: InternLMForCausalLM) -> LlamaForCausalLM:
    c = model.config
    llama_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rotary["base"]},
        attention_bias=True,
        tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5):
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= rel * scale, f"max diff {(actual - expected).abs().max()} vs {scale}"


def packed_row(lengths: list[int], vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (sum(lengths),), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return ids, positions


@pytest.mark.parametrize("overrides", SMALL_CONFIGS)
def test_logits_equal_llama_with_attention_bias(overrides):
    model = make_model(**overrides)
    llama = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert_close_rel(model(ids).logits, llama(ids).logits)


def test_padded_batch_logits_equal_llama():
    model = make_model()
    llama = llama_twin(model)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        theirs = llama(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    real = mask.bool()
    assert_close_rel(ours[real], theirs[real])


# flex runs forward-only on CPU (this test is under no_grad); flash and varlen need CUDA.
BACKENDS = ["loop", "mask", "flex"] + (["flash"] if flash_attn_varlen_func is not None and torch.cuda.is_available()
                                       else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_equal_documents_run_alone(backend):
    device = "cuda" if backend == "flash" else "cpu"
    model = make_model(packed_attention=backend).to(device)
    generator = torch.Generator().manual_seed(1)
    rows = [packed_row(lengths, 97, generator) for lengths in ([5, 1, 7, 3, 1], [10, 6, 1])]
    ids = torch.stack([r[0] for r in rows]).to(device)
    positions = torch.stack([r[1] for r in rows]).to(device)
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        for row in range(2):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for start, end in zip(starts[:-1], starts[1:]):
                alone = model(ids[row : row + 1, start:end]).logits[0]
                rel = 2e-2 if backend == "flash" else 1e-5  # flash computes fp32 models in bf16
                assert_close_rel(packed[row, start:end], alone, rel)


@pytest.mark.parametrize("device, flash, varlen, flex, expected", [
    ("cuda", True, True, True, "flash"),
    ("cuda", False, True, True, "varlen"),  # no flash-attn wheel: torch's own varlen kernel
    ("cuda", False, False, True, "flex"),  # a torch without varlen
    ("cuda", False, False, False, "loop"),
    ("cpu", True, True, True, "loop"),  # on CPU the per-document loop is the fastest, and flex has no backward
])
def test_auto_packed_attention_prefers_fused_kernels_on_cuda(device, flash, varlen, flex, expected):
    assert auto_packed_attention(device, flash, varlen, flex) == expected


def test_auto_packed_attention_on_this_machine_and_cuda_only_kernels_refuse_cpu():
    assert packed_attention_backend("auto", torch.device("cpu")).__name__ == "packed_attention_loop"
    q = torch.randn(1, 4, 2, 8)
    documents = PackedDocuments.from_position_ids(torch.arange(4)[None])
    for name in ("flash", "varlen"):
        with pytest.raises(RuntimeError, match=f"packed_attention='{name}' needs"):
            packed_attention_backend(name, q.device)(q, q, q, documents, 8**-0.5)


def test_packed_backends_agree_in_forward_and_backward():
    generator = torch.Generator().manual_seed(2)
    ids, positions = packed_row([4, 9, 1, 6], 97, generator)
    results = {}
    for backend in ("loop", "mask"):
        model = make_model(packed_attention=backend).train()
        logits = model(ids[None], position_ids=positions[None]).logits
        logits.square().mean().backward()
        results[backend] = (logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    for ref, other in zip(results["mask"], results["loop"]):
        assert_close_rel(other, ref)


def test_packed_documents_do_not_see_each_other():
    # Changing the first document must leave the second document's logits untouched.
    model = make_model()
    ids = torch.randint(0, 97, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    changed = ids.clone()
    changed[0, :5] = (changed[0, :5] + 1) % 97
    with torch.no_grad():
        a = model(ids, position_ids=positions).logits
        b = model(changed, position_ids=positions).logits
    assert torch.equal(a[0, 5:], b[0, 5:])
    assert not torch.allclose(a[0, :5], b[0, :5])


def test_dynamic_ntk_base_follows_the_formula():
    config = dict(max_position_embeddings=16)
    dynamic = make_model(rotary={"base": 10000, "type": "dynamic", "scaling_factor": 2.0}, **config)
    rotary = dynamic.model.rotary_emb
    d = dynamic.config.head_dim
    assert rotary.base_for_length(16) == 10000
    assert rotary.base_for_length(40) == pytest.approx(10000 * (2.0 * 40 / 16 - 1.0) ** (d / (d - 2)))
    origin = make_model(rotary={"base": 10000, "type": "origin"}, **config)
    assert origin.model.rotary_emb.base_for_length(40) == 10000


def test_dynamic_ntk_rescales_rope_only_beyond_max_position_embeddings():
    rotary = {"base": 10000, "type": "dynamic"}
    dynamic = make_model(rotary=rotary, max_position_embeddings=16)
    d = dynamic.config.head_dim
    rescaled_base = 10000 * (24 / 16) ** (d / (d - 2))
    as_origin = make_model(rotary={"base": rescaled_base, "type": "origin"}, max_position_embeddings=16)
    origin = make_model(rotary={"base": 10000, "type": "origin"}, max_position_embeddings=16)
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        # One 24-token document: L = 24 > 16 rescales the base.
        assert torch.equal(dynamic(ids).logits, as_origin(ids).logits)
        assert not torch.allclose(dynamic(ids).logits, origin(ids).logits)
        # Two documents of 12: L = max(position_ids) + 1 = 12, no rescaling.
        positions = torch.cat([torch.arange(12), torch.arange(12)])[None]
        assert torch.equal(dynamic(ids, position_ids=positions).logits, origin(ids, position_ids=positions).logits)


def test_dynamic_ntk_generation_past_max_position_embeddings():
    model = make_model(rotary={"base": 10000, "type": "dynamic"}, max_position_embeddings=8)
    origin = make_model(rotary={"base": 10000, "type": "origin"}, max_position_embeddings=8)
    ids = torch.randint(0, 97, (1, 5))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, 17)
    # Within max_position_embeddings the two rotary types agree.
    assert torch.equal(out[:, :8], origin.generate(ids, **kwargs)[:, :8])


def count_mlp_calls(model) -> list[int]:
    """Counts each layer's MLP forwards (wrapping forward: module hooks do not fire in checkpoint recomputes)."""
    counts = [0] * len(model.model.layers)

    def counting(index, forward):
        def counted_forward(x):
            counts[index] += 1
            return forward(x)

        return counted_forward

    for index, layer in enumerate(model.model.layers):
        layer.mlp.forward = counting(index, layer.mlp.forward)
    return counts


def grads_of_one_step(model, use_stages: bool) -> dict[str, torch.Tensor]:
    model.train()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10))])
    if use_stages:
        x = (ids, positions)
        for stage in pipeline_layers(model):
            x = stage(x)
        logits = x
    else:
        logits = model(ids, position_ids=positions).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("use_stages", [False, True])
def test_activation_checkpointing_recomputes_first_layers_with_equal_grads(use_stages):
    reference = grads_of_one_step(make_model(num_hidden_layers=4), use_stages)
    model = make_model(num_hidden_layers=4)
    target = pipeline_layers(model) if use_stages else model
    assert set_activation_checkpointing(target, 0.5) == 2
    counts = count_mlp_calls(model)
    grads = grads_of_one_step(model, use_stages)
    assert counts == [2, 2, 1, 1]  # the first int(4 * 0.5) layers ran again in backward
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name
    assert set_activation_checkpointing(model, True) == 4
    assert set_activation_checkpointing(model, False) == 0


def test_position_ids_must_start_documents_at_zero():
    model = make_model()
    ids = torch.randint(0, 97, (2, 6))
    positions = torch.tensor([list(range(6)), list(range(3, 9))])
    with pytest.raises(ValueError, match="position_ids of row 1 start at 3"):
        model(ids, position_ids=positions)
    with pytest.raises(ValueError, match="start at 3"):
        pipeline_layers(model)[1]((torch.zeros(2, 6, 32), positions))


def test_input_longer_than_position_ids_is_an_error():
    model = make_model()
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match=r"position_ids has shape \[1, 6\] but the input has shape \[1, 8\]"):
        model(ids, position_ids=torch.arange(6)[None])
    with pytest.raises(ValueError, match="position_ids has shape"):
        pipeline_layers(model)[0]((ids, torch.arange(6)[None]))


def test_unknown_rotary_type_is_an_error():
    with pytest.raises(ValueError, match=r"rotary=.* is not a RoPE: RoPE type 'yarn' is not supported"):
        InternLMConfig(rotary={"base": 10000, "type": "yarn"})
    with pytest.raises(ValueError, match="packed_attention"):
        InternLMConfig(packed_attention="xformers")
