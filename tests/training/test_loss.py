"""The training loss applies the output head in token chunks (issue: the 103k-vocabulary head without its memory
wall): the same loss, gradients and token metrics as the whole logits, without holding them. One process, tiny fp32
models; the tensor-parallel and pipeline versions run in tests/parallel/test_tensor_parallel.py's launches."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from evods.data import IGNORE_INDEX
from evods.model import InternLMConfig, InternLMForCausalLM
from evods.training.loss import FullLogits, PackedLoss, TokenMetrics
from evods.training.loss_kernels import (
    auto_chunk_tokens,
    choose_loss_kernel,
    chunked_linear_cross_entropy,
    liger_fused_linear_cross_entropy,
)

torch.set_num_threads(1)

VOCAB, ROWS, SEQ = 1000, 2, 20  # 40 tokens per micro-batch
NUM_TYPES = 3


def make_model(tie_word_embeddings: bool, dtype=torch.float32) -> InternLMForCausalLM:
    torch.manual_seed(0)
    config = InternLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4)
    model = InternLMForCausalLM(config).to(dtype)
    if tie_word_embeddings:  # one parameter for both: its gradient sums the lookup's and the head's
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # logits spread over several units, so the softmax is far from uniform
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def micro_batch(masked_tokens: int, model: InternLMForCausalLM):
    """Two packed rows; the first `masked_tokens` labels of row 0 are -100 (a prompt), and two more here and there.
    Every third label is the model's own prediction, so that accuracy counts some hits."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    position_ids = torch.tensor([list(range(7)) + list(range(SEQ - 7)), list(range(SEQ))])
    labels = input_ids.roll(-1, dims=1)
    with torch.no_grad():
        labels[:, ::3] = model(input_ids, position_ids=position_ids).logits.argmax(-1)[:, ::3]
    labels[0, :masked_tokens] = IGNORE_INDEX
    labels[1, [3, 11]] = IGNORE_INDEX
    type_ids = torch.randint(0, NUM_TYPES, (ROWS, SEQ), generator=generator)
    return input_ids, position_ids, labels, type_ids


def one_step(model, kernel: str, chunk_tokens: int | None, label_smoothing: float, batch) -> dict:
    """Loss, gradients and metrics of one micro-batch through the model and the training loss."""
    input_ids, position_ids, labels, type_ids = batch
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids, position_ids=position_ids, skip_lm_head=True).last_hidden_state
    hidden.retain_grad()
    metrics = TokenMetrics(NUM_TYPES)
    loss = PackedLoss(model.lm_head, label_smoothing, metrics, FullLogits(), kernel, chunk_tokens)(
        hidden, (labels, type_ids))
    loss.backward()
    return {"loss": loss.detach(), "grad hidden": hidden.grad, "grad lm_head": model.lm_head.weight.grad,
            "grad embedding": model.model.embed_tokens.weight.grad,
            "grad layer 0": model.model.layers[0].mlp.up_proj.weight.grad, "metrics": metrics.reduce_and_reset()}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str):
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)
    assert error <= rel, f"{what}: relative error {error:.3g} > {rel}"


# chunk sizes: 8 divides both the 40 tokens and the 24 kept once 16 are masked, 7 divides neither; with 16 masked
# the first two chunks of 8 tokens are all prompt.
@pytest.mark.parametrize("masked_tokens", [0, 16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_chunked_loss_equals_whole_logits(masked_tokens, label_smoothing, tie_word_embeddings):
    model = make_model(tie_word_embeddings)
    batch = micro_batch(masked_tokens, model)
    expected = one_step(model, "full", None, label_smoothing, batch)
    for chunk_tokens in (7, 8, None):
        result = one_step(model, "chunked", chunk_tokens, label_smoothing, batch)
        where = f"chunk_tokens={chunk_tokens}"
        for name in ("loss", "grad hidden", "grad lm_head", "grad embedding", "grad layer 0"):
            assert_relative(result[name], expected[name], 1e-6, f"{where}: {name}")
        # per-type loss sums, token counts and correct predictions: loss/<type>, acc and perplexity follow from them
        for name, value in expected["metrics"].items():
            assert_relative(result["metrics"][name], value, 1e-6, f"{where}: metrics {name}")
        assert torch.equal(result["metrics"]["tokens"], expected["metrics"]["tokens"])
        assert torch.equal(result["metrics"]["correct"], expected["metrics"]["correct"])
    if tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert expected["metrics"]["correct"].sum() > 0, "the argmax comparison is not vacuous"


def test_bf16_chunked_loss_is_close_to_whole_logits():
    model = make_model(tie_word_embeddings=False, dtype=torch.bfloat16)
    batch = micro_batch(5, model)
    expected = one_step(model, "full", None, 0.0, batch)
    result = one_step(model, "chunked", 7, 0.0, batch)
    assert_relative(result["loss"], expected["loss"], 1e-3, "loss")
    for name in ("grad hidden", "grad lm_head", "grad embedding"):
        assert result[name].dtype == torch.bfloat16
        assert_relative(result[name], expected[name], 2e-2, name)


def test_a_micro_batch_without_labels_costs_zero_and_trains_nothing():
    model = make_model(tie_word_embeddings=False)
    input_ids, position_ids, labels, type_ids = micro_batch(0, model)
    batch = (input_ids, position_ids, torch.full_like(labels, IGNORE_INDEX), type_ids)
    for kernel in ("full", "chunked"):
        result = one_step(model, kernel, 8, 0.1, batch)
        assert result["loss"].item() == 0.0, kernel
        assert not result["grad lm_head"].any() and not result["grad hidden"].any(), kernel
        assert result["metrics"]["tokens"].sum() == 0


def test_evaluation_under_no_grad_computes_no_gradients():
    model = make_model(tie_word_embeddings=False)
    hidden = torch.randn(30, 32)
    labels = torch.randint(0, VOCAB, (30,))
    with torch.no_grad():
        loss_sum, token_losses, predictions = chunked_linear_cross_entropy(hidden, model.lm_head.weight, labels,
                                                                           FullLogits(), chunk_tokens=8)
    logits = hidden @ model.lm_head.weight.detach().t()
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert not loss_sum.requires_grad
    torch.testing.assert_close(token_losses, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(predictions, logits.argmax(-1))


def test_the_whole_logits_are_never_held():
    """No op of a chunked step (forward or backward) makes a [tokens, vocab] tensor of more than one chunk of 8
    tokens; the whole-logits kernel makes [40, vocab] ones."""
    model = make_model(tie_word_embeddings=False)
    batch = micro_batch(0, model)
    most_rows = {}
    for kernel in ("full", "chunked"):
        with CreatedShapes() as created:
            one_step(model, kernel, 8, 0.1, batch)
        most_rows[kernel] = max(shape.numel() // VOCAB for shape in created.shapes if shape[-1:] == (VOCAB,))
    assert most_rows == {"full": ROWS * SEQ, "chunked": 8}


class CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates (views hold no memory of their own: left out)."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.shapes += [t.shape for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_model_skips_the_head_and_pipeline_stages_agree():
    model = make_model(tie_word_embeddings=False).eval()
    input_ids, position_ids, _, _ = micro_batch(0, model)
    with torch.no_grad():
        full = model(input_ids, position_ids=position_ids)
        skipped = model(input_ids, position_ids=position_ids, skip_lm_head=True)
        x = (input_ids, position_ids)
        for stage in model.pipeline_layers(skip_lm_head=True):
            x = stage(x)
    assert skipped.logits is None and full.last_hidden_state is None
    assert torch.equal(model.lm_head(skipped.last_hidden_state).float(), full.logits)
    assert torch.equal(x, skipped.last_hidden_state)


def test_chunk_size_follows_hidden_size_and_vocabulary():
    assert auto_chunk_tokens(vocab_size=103168, hidden_size=512) == 512  # logits chunk = head weight: 211 MB fp32
    assert auto_chunk_tokens(vocab_size=103168, hidden_size=4096) == 2**26 // 103168  # capped at 256 MiB of logits
    assert auto_chunk_tokens(vocab_size=103168 // 8, hidden_size=4096) == 4096  # an 8-way vocabulary shard
    assert auto_chunk_tokens(vocab_size=512, hidden_size=64) == 256  # never tiny chunks


@pytest.mark.parametrize("requested, device, vocab_split, liger, expected", [
    ("auto", "cpu", False, False, "chunked"),
    ("auto", "cpu", False, True, "chunked"),
    ("auto", "cuda", False, True, "liger"),
    ("auto", "cuda", False, False, "chunked"),
    ("auto", "cuda", True, True, "chunked"),  # Liger has no vocabulary-parallel kernel
    ("liger", "cuda", False, True, "liger"),
    ("chunked", "cuda", False, True, "chunked"),
    ("full", "cuda", True, True, "full"),
])
def test_kernel_choice(requested, device, vocab_split, liger, expected):
    assert choose_loss_kernel(requested, device, vocab_split, liger_installed=liger) == expected


@pytest.mark.parametrize("device, vocab_split, liger, reason", [
    ("cpu", False, True, "it needs CUDA"),
    ("cuda", False, False, "it needs liger-kernel>=0.8.2"),
    ("cuda", True, True, "splits the vocabulary"),
])
def test_asking_for_liger_where_it_cannot_run_says_why(device, vocab_split, liger, reason):
    with pytest.raises(ValueError, match=reason):
        choose_loss_kernel("liger", device, vocab_split, liger_installed=liger)


def test_liger_is_not_importable_here_and_the_config_error_names_the_key():
    from evods.config import ConfigError
    from evods.parallel import ParallelLayout
    from evods.training.loss import build_loss
    from testkit.train_configs import tiny_config

    assert liger_fused_linear_cross_entropy() is None  # no liger-kernel (nor triton) in the CPU environment
    model = make_model(tie_word_embeddings=False)
    one_rank = ParallelLayout(dp=1, pp=1, tp=1)
    assert build_loss(tiny_config(), one_rank, model.lm_head, "cpu", None).kernel == "chunked"
    with pytest.raises(ConfigError, match=r"demo_cpu\.py.*loss\.kernel='liger' cannot run here: it needs CUDA"):
        build_loss(tiny_config(loss=dict(kernel="liger")), one_rank, model.lm_head, "cpu", None)
    assert build_loss(tiny_config(loss=dict(kernel="full", chunk_tokens=64)), one_rank, model.lm_head, "cpu",
                      None).kernel == "full"
