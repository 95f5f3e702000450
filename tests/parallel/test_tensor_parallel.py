"""Tensor parallelism (issue: tensor parallel), with pipeline and data parallelism, trains exactly like one process.

Each topology (tp, pp, dp) is one launch that trains several variants in turn through the real Trainer, on packed
real text with the real 103168-token vocabulary, so the process start-up is paid once per topology.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit.distributed import run_distributed
from testkit.paths import DATA, TOKENIZER
from testkit.train_configs import tiny_config

STEPS = 3
ROWS_PER_STEP = 4  # packed rows per optimizer step, summed over data-parallel ranks
# Small hidden size, so the vocabulary-parallel head over 103168 tokens stays cheap.
MODEL = dict(hidden_size=32, num_layers=2, num_attention_heads=4, vocab_size=103168, mlp_ratio=2)
SENTENCES = 400  # short documents, so several pack into each 64-token row
ROWS_TOKENS = 64  # micro_bsz × seq_len


# The loss: the head in chunks of 24 tokens (several per 64-token micro-batch, and not dividing the tokens kept), or
# the whole logits. The reference materialises them; the parallel runs mostly do not.
CHUNKED = dict(kernel="chunked", chunk_tokens=24)
FULL = dict(kernel="full")


class Variant:
    def __init__(self, recompute: bool, embed_split_hidden: bool = True, parallel_output: bool = True,
                 loss: dict = CHUNKED, sequence_parallel: bool = False, kv_heads: int | None = None,
                 isp: bool = False, zero_stage: int = 1):
        self.model = dict(checkpoint=recompute, embed_split_hidden=embed_split_hidden, parallel_output=parallel_output,
                          num_kv_attention_heads=kv_heads)
        self.loss = loss
        self.sequence_parallel = sequence_parallel
        self.kv_heads = kv_heads  # grouped-query attention; None: multi-head
        self.isp = isp  # the topology's tensor size is an isp size (Ulysses sequence parallelism)
        self.zero_stage = zero_stage
        self.name = (f"recompute={recompute},embed_split_hidden={embed_split_hidden},parallel_output={parallel_output},"
                     f"sequence_parallel={sequence_parallel},loss={loss['kernel']},kv_heads={kv_heads},isp={isp},"
                     f"zero_stage={zero_stage}")


def sequence_parallel_variants(embed_split_hidden: bool, parallel_output: bool) -> list:
    return [Variant(recompute, embed_split_hidden, parallel_output, sequence_parallel=True)
            for recompute in (False, True)]


# Grouped-query attention (issue: InternLM2): 2 KV heads for the 4 query heads, one per tensor rank, and 1 KV head,
# which both tensor ranks hold a copy of (its gradient summed over them).
OWN_KV, SHARED_KV = 2, 1


# (tp, pp, dp) -> variants; the embedding and output layouts only matter under tensor parallelism, so every one of
# their four combinations runs at tp=2, both with and without a pipeline. Sequence parallelism (issue: sequence
# parallelism) runs with activation checkpointing off and on in each tensor-parallel topology. The chunked loss runs
# vocabulary-parallel under tp=2 and on the last pipeline stage; the whole-logits loss too, once each.
TOPOLOGIES = {
    (2, 1, 1): [Variant(False, True, True), Variant(True, False, False, loss=FULL),
                *sequence_parallel_variants(False, True), Variant(False, kv_heads=OWN_KV),
                Variant(True, False, True, kv_heads=SHARED_KV)],
    (2, 2, 1): [Variant(True, True, False, loss=FULL), Variant(False, False, True),
                *sequence_parallel_variants(True, False), Variant(False, True, True, kv_heads=SHARED_KV)],
    (2, 1, 2): [Variant(True, False, True), Variant(False, True, False), *sequence_parallel_variants(True, True),
                Variant(False, False, True, sequence_parallel=True, kv_heads=SHARED_KV)],
    (1, 2, 1): [Variant(True)],
    (1, 1, 2): [Variant(False)],
    (1, 2, 2): [Variant(True)],
}
# InternEvo's isp (issue 27), (sp, pp, dp) -> variants: recompute off and on, the chunked and the whole-logits loss,
# ZeRO-2 over the 4 ranks of dp 2 x sp 2, a pipeline whose stages pass token slices, and at sp 4 the 2 KV heads of
# the 4 query heads replicated to one per rank.
ISP_TOPOLOGIES = {
    (2, 1, 1): [Variant(False, isp=True), Variant(True, loss=FULL, isp=True)],
    (2, 1, 2): [Variant(True, isp=True), Variant(False, isp=True, zero_stage=2)],
    (2, 2, 1): [Variant(False, isp=True), Variant(True, loss=FULL, isp=True)],
    (4, 1, 1): [Variant(False, kv_heads=OWN_KV, isp=True), Variant(True, kv_heads=OWN_KV, isp=True)],
}
# The one-process runs: per KV heads, the training every variant with those heads must repeat
REFERENCE = (1, 1, 1), [Variant(False, loss=FULL, kv_heads=kv_heads) for kv_heads in (None, OWN_KV, SHARED_KV)]


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    """Sentences of the first wiki articles, one document per line, tokenized with V7_sft.model into en/."""
    from evods.data.tokenize import tokenize_file

    root = tmp_path_factory.mktemp("tp_data")
    with open(DATA / "pretrain_en" / "wiki_demo.txt", encoding="utf-8") as f:
        articles = [next(f) for _ in range(2)]
    sentences = [s for article in articles for s in re.split(r"(?<=\.) ", article.strip()) if s][:SENTENCES]
    text = root / "wiki_sentences.txt"
    text.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    tokenize_file(text, root / "train" / "en" / "wiki.bin", TOKENIZER, progress=False)
    return root / "train"


def train_variants(topology: tuple, variants: list, train_folder: str, run_root: str) -> dict:
    import torch.distributed as dist

    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    tp, pp, dp = topology
    init_distributed("torch")
    results, groups = {}, None
    for variant in variants:
        cfg = tiny_config(
            data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP // dp, total_steps=STEPS,
                      train_folder=train_folder),
            model=dict(MODEL, dtype="torch.float32", **variant.model),
            parallel=dict(pipeline=dict(size=pp), zero1=-1, tensor=dict(size=tp, mode="isp" if variant.isp else "mtp"),
                          sequence_parallel=variant.sequence_parallel, zero=dict(stage=variant.zero_stage)),
            lr_scheduler=dict(total_steps=STEPS, warmup_ratio=0.0),
            loss=variant.loss,
        )
        run_dir = Path(run_root) / variant.name
        trainer = Trainer(cfg, run_dir=run_dir)
        state = trainer.train()
        trainer.close()
        metrics_file = run_dir / "metrics.jsonl"  # written by the log rank only
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if trainer.sink else None
        received = getattr(trainer.engine.engine, "pipe_recv_buf", None)  # what a later pipeline stage receives
        results[variant.name] = {"steps": [(e["loss"], e["grad_norm"]) for e in state.history], "metrics": metrics,
                                 "received": received and [list(t.shape) for t in received]}
        grid = trainer.grid
        groups = {name: dist.get_process_group_ranks(group) for name, group in (
            ("tensor", grid.get_tensor_model_parallel_group()), ("pipe", grid.get_pipe_parallel_group()),
            ("data", grid.get_data_parallel_group()))}
        if grid.get_ulysses_group() is not None:
            groups["isp"] = dist.get_process_group_ranks(grid.get_ulysses_group())
    return {"rank": dist.get_rank(), "results": results, "groups": groups}


def launch(topology: tuple, variants: list, train_folder: Path, run_root: Path) -> list[dict]:
    tp, pp, dp = topology
    return run_distributed(train_variants, world=tp * pp * dp,
                           args=(topology, variants, str(train_folder), str(run_root)))


@pytest.fixture(scope="module")
def reference(train_folder, tmp_path_factory) -> dict:
    """KV heads -> the one-process run's results."""
    topology, variants = REFERENCE
    results = launch(topology, variants, train_folder, tmp_path_factory.mktemp("ref"))[0]["results"]
    return {variant.kv_heads: results[variant.name] for variant in variants}


def test_reference_trains_on_packed_rows(reference):
    losses = [loss for loss, _ in reference[None]["steps"]]
    assert len(set(losses)) == STEPS, "each step sees new data and new weights"
    assert all(entry["num_samples_in_batch"] > ROWS_PER_STEP for entry in reference[None]["metrics"]), \
        "rows pack several documents"
    assert len({reference[kv_heads]["steps"][0] for kv_heads in reference}) == len(reference), \
        "the KV heads make other models"


def assert_same_training(reference: dict, result: dict, where: str) -> None:
    assert len(result["steps"]) == STEPS, where
    for step, ((ref_loss, ref_norm), (loss, norm)) in enumerate(zip(reference["steps"], result["steps"])):
        assert math.isclose(loss, ref_loss, rel_tol=1e-5), (where, step, loss, ref_loss)
        assert math.isclose(norm, ref_norm, rel_tol=1e-5), (where, step, norm, ref_norm)
    if result["metrics"] is not None:  # the log rank's token metrics: per-token losses and the argmax agree too
        for ref_entry, entry in zip(reference["metrics"], result["metrics"]):
            for key in ("acc", "perplexity", "loss/en"):
                assert math.isclose(entry[key], ref_entry[key], rel_tol=1e-5), (where, key, entry[key])


def expected_groups(rank: int, topology: tuple) -> dict:
    """InternEvo's layout: global_rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank (tensor ranks consecutive)."""
    tp, pp, dp = topology
    dp_rank, pp_rank, tp_rank = rank // (pp * tp), (rank // tp) % pp, rank % tp
    at = lambda d, p, t: d * pp * tp + p * tp + t  # noqa: E731
    return {"tensor": [at(dp_rank, pp_rank, t) for t in range(tp)],
            "pipe": [at(dp_rank, p, tp_rank) for p in range(pp)],
            "data": [at(d, pp_rank, tp_rank) for d in range(dp)]}


@pytest.mark.parametrize("topology", list(TOPOLOGIES), ids=lambda t: "tp{}_pp{}_dp{}".format(*t))
def test_parallel_training_matches_one_process(topology, reference, train_folder, tmp_path):
    ranks = launch(topology, TOPOLOGIES[topology], train_folder, tmp_path)
    assert sum(rank["results"][v.name]["metrics"] is not None for rank in ranks for v in TOPOLOGIES[topology]) \
        == len(TOPOLOGIES[topology]), "exactly one rank logs each run"
    for rank in ranks:
        assert rank["groups"] == expected_groups(rank["rank"], topology)
        for variant in TOPOLOGIES[topology]:
            assert_same_training(reference[variant.kv_heads], rank["results"][variant.name],
                                 f"rank {rank['rank']} {variant.name}")
            received = rank["results"][variant.name]["received"]
            if variant.sequence_parallel and received is not None:
                # A later pipeline stage receives this tensor rank's slice of the tokens and the full position_ids.
                assert received == [[1, ROWS_TOKENS // topology[0], MODEL["hidden_size"]], [1, ROWS_TOKENS]], \
                    (variant.name, received)


def documents_crossing_slices(train_folder: Path, sp: int) -> int:
    """How many of the first steps' rows (one process's data order) have a document running across a boundary between
    the token slices of `sp` isp ranks: position_ids not restarting there."""
    from evods.data import build_train_loader

    cfg = tiny_config(data=dict(seq_len=32, micro_bsz=2, micro_num=ROWS_PER_STEP, total_steps=STEPS,
                                train_folder=str(train_folder)))
    loader, _, _ = build_train_loader(cfg.data, 0, 1, 0)
    batches = iter(loader)
    rows = torch.cat([next(batches)["position_ids"] for _ in range(STEPS)])
    boundaries = rows[:, ROWS_TOKENS // sp::ROWS_TOKENS // sp]
    return int((boundaries != 0).any(dim=1).sum())


@pytest.mark.parametrize("topology", list(ISP_TOPOLOGIES), ids=lambda t: "isp{}_pp{}_dp{}".format(*t))
def test_isp_training_matches_one_process(topology, reference, train_folder, tmp_path):
    """Ulysses sequence parallelism: each rank trains on 1/sp of every row's tokens, with every weight whole, and the
    losses, gradient norms and token metrics (each token counted once) are one process's."""
    sp, pp, dp = topology
    assert documents_crossing_slices(train_folder, sp) >= ROWS_PER_STEP, "documents cross the slice edges of rows"
    ranks = launch(topology, ISP_TOPOLOGIES[topology], train_folder, tmp_path)
    assert sum(rank["results"][v.name]["metrics"] is not None for rank in ranks for v in ISP_TOPOLOGIES[topology]) \
        == len(ISP_TOPOLOGIES[topology]), "exactly one rank logs each run"
    for rank in ranks:
        assert rank["groups"] == expected_isp_groups(rank["rank"], topology)
        for variant in ISP_TOPOLOGIES[topology]:
            result = rank["results"][variant.name]
            assert_same_training(reference[variant.kv_heads], result, f"rank {rank['rank']} {variant.name}")
            for ref_entry, entry in zip(reference[variant.kv_heads]["metrics"], result["metrics"] or []):
                assert entry["num_consumed_tokens"] == ref_entry["num_consumed_tokens"]
                # a step's real tokens, each counted once, over all ranks and the step's time
                assert entry["tgs"] == pytest.approx(
                    ROWS_PER_STEP * ROWS_TOKENS / (sp * pp * dp) / entry["fwd_bwd_time"], rel=0.05)
            if result["received"] is not None:  # a later pipeline stage gets this rank's token slice
                assert result["received"] == [[1, ROWS_TOKENS // sp, MODEL["hidden_size"]], [1, ROWS_TOKENS]]
    assert (pp > 1) == any(rank["results"][v.name]["received"] for rank in ranks for v in ISP_TOPOLOGIES[topology])


def expected_isp_groups(rank: int, topology: tuple) -> dict:
    """InternEvo's isp layout: global_rank = dp_rank * (pp * sp) + pp_rank * sp + sp_rank (a stage's isp ranks
    consecutive); DeepSpeed's data-parallel group is every rank holding the stage's weights, dp x sp."""
    sp, pp, dp = topology
    dp_rank, pp_rank, sp_rank = rank // (pp * sp), (rank // sp) % pp, rank % sp
    at = lambda d, p, s: d * pp * sp + p * sp + s  # noqa: E731
    return {"tensor": [rank], "pipe": [at(dp_rank, p, sp_rank) for p in range(pp)],
            "data": [at(d, pp_rank, s) for d in range(dp) for s in range(sp)],
            "isp": [at(dp_rank, pp_rank, s) for s in range(sp)]}


# ------------------------------------------------------------------------------------- weights and the loss op

def tiny_hf_model(vocab_size: int = 96, num_key_value_heads: int | None = None):
    from evods.model import InternLMConfig, InternLMForCausalLM

    torch.manual_seed(0)
    config = InternLMConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=num_key_value_heads, dtype=torch.float32)
    model = InternLMForCausalLM(config).eval()
    with torch.no_grad():  # biases and norms that are not all zeros and ones, so their gradients and shards show
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def split_gather_and_loss(embed_split_hidden: bool) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    from evods.parallel import (
        apply_tensor_parallel,
        gather_tensor_parallel_state_dict,
        vocab_parallel_argmax,
        vocab_parallel_cross_entropy,
    )
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    group, rank = dist.group.WORLD, dist.get_rank()
    full_model = tiny_hf_model()
    full = {k: v.clone() for k, v in full_model.state_dict().items()}
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # two documents in row 0
    full_logits = full_model(input_ids=input_ids, position_ids=position_ids).logits

    model = apply_tensor_parallel(tiny_hf_model(), group, rank, 2, embed_split_hidden, parallel_output=True)
    q_shard = model.model.layers[0].self_attn.q_proj.weight
    gathered = gather_tensor_parallel_state_dict(model, group, embed_split_hidden)
    local_logits = model(input_ids=input_ids, position_ids=position_ids).logits

    labels = input_ids.roll(-1, dims=1)
    labels[0, :3] = -100
    shard_logits = full_logits.detach().chunk(2, dim=-1)[rank].requires_grad_()
    full_leaf = full_logits.detach().requires_grad_()
    losses = {}
    for smoothing in (0.0, 0.1):
        parallel = vocab_parallel_cross_entropy(shard_logits, labels, group, label_smoothing=smoothing)
        parallel.sum().backward()
        expected = F.cross_entropy(full_leaf.flatten(0, 1), labels.flatten(), reduction="none",
                                   label_smoothing=smoothing).view(labels.shape)
        expected.sum().backward()
        losses[smoothing] = (parallel.detach(), expected.detach())
    return as_numpy({
        "grouped_query": grouped_query_attention_split(input_ids, position_ids, labels, embed_split_hidden),
        "chunked_losses": chunked_vocab_parallel_losses(group, rank),
        **sequence_parallel_forward_backward(full_model, input_ids, position_ids, labels, embed_split_hidden),
        "rank": rank, "full": full, "gathered": gathered, "q_shard": q_shard.detach(),
        "q_marked": (q_shard.tensor_model_parallel, q_shard.partition_dim),
        "norm_marked": hasattr(model.model.norm.weight, "tensor_model_parallel"),
        "full_logits": full_logits.detach(), "local_logits": local_logits.detach(), "losses": losses,
        "grads": (shard_logits.grad, full_leaf.grad.chunk(2, dim=-1)[rank]),
        "argmax": (vocab_parallel_argmax(shard_logits.detach(), group), full_logits.argmax(-1)),
    })


def chunked_vocab_parallel_losses(group, rank: int) -> dict:
    """The training loss on this rank's vocabulary shard of a head, in chunks, and on one process with the whole
    head and whole logits: loss, gradients (hidden states; this rank's rows of the head weight) and token metrics."""
    from evods.parallel import VocabParallelLogits
    from evods.parallel.layers import ColumnParallelLinear
    from evods.training.loss import FullLogits, PackedLoss, TokenMetrics

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 32, generator=generator)
    hidden = torch.randn(2, 12, 32, generator=generator)
    labels = torch.randint(0, 96, (2, 12), generator=generator)
    labels[:, ::3] = (hidden @ weight.t()).argmax(-1)[:, ::3]  # some hits for the accuracy
    labels[0, :3] = -100  # 21 tokens kept: chunks of 7 divide them, chunks of 5 do not
    type_ids = torch.randint(0, 2, (2, 12), generator=generator)
    heads = {"chunked": (ColumnParallelLinear(weight.chunk(2)[rank].clone(), None, group), VocabParallelLogits(group)),
             "one process": (torch.nn.Linear(32, 96, bias=False), FullLogits())}
    heads["one process"][0].weight.data.copy_(weight)
    results = {}
    for smoothing in (0.0, 0.1):
        for chunk_tokens in (5, 7):
            for name, (head, vocab) in heads.items():
                head.weight.grad = None
                leaf = hidden.clone().requires_grad_()
                metrics = TokenMetrics(2)
                kernel = "chunked" if name == "chunked" else "full"
                loss = PackedLoss(head, smoothing, metrics, vocab, kernel, chunk_tokens)(leaf, (labels, type_ids))
                loss.backward()
                grad_weight = head.weight.grad if name == "chunked" else head.weight.grad.chunk(2)[rank]
                results[smoothing, chunk_tokens, name] = {"loss": loss.detach(), "grad hidden": leaf.grad,
                                                          "grad weight": grad_weight, **metrics.reduce_and_reset()}
    return results


def sequence_parallel_forward_backward(full_model, input_ids, position_ids, labels, embed_split_hidden: bool) -> dict:
    """The tp=2 model with sequence parallelism against the one-process model: logits, and every parameter's
    gradient (this rank's shard of the full gradient; the replicated norms and o_proj bias whole)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from evods.parallel import TensorParallelSplit, apply_tensor_parallel, vocab_parallel_cross_entropy

    group, rank = dist.group.WORLD, dist.get_rank()
    full_model.zero_grad()
    full_logits = full_model(input_ids=input_ids, position_ids=position_ids).logits
    F.cross_entropy(full_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    model = apply_tensor_parallel(tiny_hf_model(), group, rank, 2, embed_split_hidden, parallel_output=True,
                                  sequence_parallel=True)
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    vocab_parallel_cross_entropy(logits, labels, group).sum().backward()
    full_grads = dict(full_model.named_parameters())
    split = TensorParallelSplit(2, embed_split_hidden)
    grads = {name: (param.grad, split.shard(name, full_grads[name].grad, rank))
             for name, param in model.named_parameters()}
    try:
        model(input_ids=input_ids[:, :11], position_ids=position_ids[:, :11])
        odd_row_error = None
    except ValueError as error:  # raised before any collective, on every rank alike
        odd_row_error = str(error)
    return {"sp_logits": (logits.detach(), full_logits.detach().chunk(2, dim=-1)[rank]), "sp_grads": grads,
            "sp_marked": sorted(name for name, param in model.named_parameters()
                                if getattr(param, "sequence_parallel", False)),
            "sp_odd_row_error": odd_row_error}


def grouped_query_attention_split(input_ids, position_ids, labels, embed_split_hidden: bool) -> dict:
    """4 query heads with 2 KV heads (one per tensor rank) and with 1 (a copy on both ranks), at tp=2 with and without
    sequence parallelism, against one process: logits, every gradient (this rank's part of the full one), the weights
    gathered back, and the gradient norm counted as DeepSpeed counts it (marked parameters on every rank, the others
    on tensor rank 0)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from evods.model import HeadSplit
    from evods.parallel import (
        TensorParallelSplit,
        apply_tensor_parallel,
        gather_tensor_parallel_state_dict,
        vocab_parallel_cross_entropy,
    )

    group, rank = dist.group.WORLD, dist.get_rank()
    results = {}
    for kv_heads in (2, 1):
        full_model = tiny_hf_model(num_key_value_heads=kv_heads)
        full_logits = full_model(input_ids=input_ids, position_ids=position_ids).logits
        F.cross_entropy(full_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
        full_grads = {name: param.grad for name, param in full_model.named_parameters()}
        split = TensorParallelSplit.of(full_model.config, 2, embed_split_hidden)
        for sequence_parallel in (False, True):
            model = apply_tensor_parallel(tiny_hf_model(num_key_value_heads=kv_heads), group, rank, 2,
                                          embed_split_hidden, parallel_output=True, sequence_parallel=sequence_parallel)
            gathered = gather_tensor_parallel_state_dict(model, group, embed_split_hidden)
            logits = model(input_ids=input_ids, position_ids=position_ids).logits
            vocab_parallel_cross_entropy(logits, labels, group).sum().backward()
            counted = sum(param.grad.square().sum() for param in model.parameters()
                          if getattr(param, "tensor_model_parallel", False) or rank == 0)
            dist.all_reduce(counted, group=group)
            results[kv_heads, sequence_parallel] = {
                "logits": (logits.detach(), full_logits.detach().chunk(2, dim=-1)[rank]),
                "grads": {name: (param.grad, split.shard(name, full_grads[name], rank))
                          for name, param in model.named_parameters()},
                "gathered": {name: (tensor, full_model.state_dict()[name]) for name, tensor in gathered.items()},
                "grad_norm": (counted.sqrt(), sum(grad.square().sum() for grad in full_grads.values()).sqrt()),
                "k_rows": (model.model.layers[0].self_attn.k_proj.weight.detach(),
                           full_model.model.layers[0].self_attn.k_proj.weight.detach().unflatten(0, (kv_heads, -1))[
                               list(HeadSplit(4, kv_heads, 2).kv_heads(rank))].flatten(0, 1)),
                "groups": model.model.layers[0].self_attn.num_key_value_groups,
            }
    return results


def as_numpy(value):
    """Tensors as numpy arrays: a torch tensor crosses the result queue as a shared-memory handle that dies with
    the worker process."""
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    if isinstance(value, dict):
        return {k: as_numpy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(as_numpy(v) for v in value)
    return value


@pytest.fixture(scope="module")
def split_runs() -> dict:
    return {split: run_distributed(split_gather_and_loss, world=2, args=(split,)) for split in (True, False)}


@pytest.mark.parametrize("embed_split_hidden", [True, False])
def test_split_then_gather_gives_the_hf_weights_back(split_runs, embed_split_hidden):
    ranks = split_runs[embed_split_hidden]
    head_dim, heads_per_rank = 8, 2
    for out in ranks:
        assert out["gathered"].keys() == out["full"].keys()
        for name, array in out["full"].items():
            assert np.array_equal(out["gathered"][name], array), name
        # Rank t holds query heads [2t, 2t + 2): the rows InternEvo's Wqkv shard t holds for q.
        rows = slice(out["rank"] * heads_per_rank * head_dim, (out["rank"] + 1) * heads_per_rank * head_dim)
        assert np.array_equal(out["q_shard"], out["full"]["model.layers.0.self_attn.q_proj.weight"][rows])
        assert out["q_marked"] == (True, 0) and not out["norm_marked"]
        # The tensor-parallel forward gives this rank's vocabulary slice of the one-process logits.
        expected = np.split(out["full_logits"], 2, axis=-1)[out["rank"]]
        np.testing.assert_allclose(out["local_logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embed_split_hidden", [True, False])
def test_sequence_parallel_model_matches_one_process(split_runs, embed_split_hidden):
    """Logits exactly as tensor parallelism alone computes them (the same arithmetic), and every gradient the one
    process's: the replicated norm weights and o_proj bias get their slices' gradients summed over the tensor group."""
    for out in split_runs[embed_split_hidden]:
        np.testing.assert_allclose(*out["sp_logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["sp_logits"][0], out["local_logits"])
        for name, (grad, expected) in out["sp_grads"].items():
            np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6, err_msg=name)
        layers = [f"model.layers.{i}." for i in range(2)]
        assert out["sp_marked"] == sorted([f"{layer}{name}" for layer in layers for name in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.bias")]
            + ["model.norm.weight"])
        assert out["sp_odd_row_error"] == ("sequence parallelism splits the 11 tokens of each row over 2 tensor "
                                           "ranks, which does not divide them; use rows whose length is a multiple "
                                           "of 2")


@pytest.mark.parametrize("embed_split_hidden", [True, False])
def test_grouped_query_attention_splits_and_trains_like_one_process(split_runs, embed_split_hidden):
    """2 KV heads for 4 query heads at tp=2: each rank holds its own KV head; 1 KV head: both ranks hold a copy, whose
    gradient is the sum of both ranks' query heads' shares, counted once in the gradient norm."""
    for out in split_runs[embed_split_hidden]:
        for (kv_heads, sequence_parallel), result in out["grouped_query"].items():
            where = f"rank {out['rank']}, {kv_heads} KV heads, sequence_parallel={sequence_parallel}"
            np.testing.assert_allclose(*result["logits"], rtol=1e-5, atol=1e-6, err_msg=where)
            for name, (grad, expected) in result["grads"].items():
                np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6, err_msg=f"{where}: {name}")
            for name, (gathered, full) in result["gathered"].items():
                assert np.array_equal(gathered, full), (where, name)
            np.testing.assert_allclose(*result["grad_norm"], rtol=1e-5, err_msg=where)
            assert np.array_equal(*result["k_rows"]), where  # the KV head(s) this rank's query heads use
            assert result["groups"] == 2, where  # each rank: 2 query heads on 1 KV head, what transformers reads


def test_vocab_parallel_cross_entropy_matches_torch(split_runs):
    for rank in split_runs[True]:
        for smoothing, (parallel, expected) in rank["losses"].items():
            np.testing.assert_allclose(parallel, expected, rtol=1e-6, atol=1e-6, err_msg=f"smoothing={smoothing}")
            assert (parallel[0, :3] == 0).all(), "ignored labels cost nothing"
        np.testing.assert_allclose(*rank["grads"], rtol=1e-6, atol=1e-7)
        assert np.array_equal(*rank["argmax"])


def test_chunked_vocab_parallel_loss_matches_one_process(split_runs):
    for rank in split_runs[True]:
        runs = rank["chunked_losses"]
        for smoothing, chunk_tokens, name in runs:
            if name != "chunked":
                continue
            chunked, expected = runs[smoothing, chunk_tokens, "chunked"], runs[smoothing, chunk_tokens, "one process"]
            for key, value in expected.items():
                error = np.linalg.norm(chunked[key] - value) / max(np.linalg.norm(value), 1e-30)
                assert error <= 1e-6, (rank["rank"], smoothing, chunk_tokens, key, error)
            assert np.array_equal(chunked["correct"], expected["correct"]) and expected["correct"].sum() > 0


# ---------------------------------------------------------------------------------------------- one process

def test_split_table_is_internevo_layout():
    """InternEvo's tensor-parallel split dimensions, as its checkpoints store them, in HF names: what the checkpoint
    formats rely on."""
    from evods.parallel import TensorParallelSplit

    split_dim = lambda name, embed_split_hidden: TensorParallelSplit(2, embed_split_hidden).split_dim(name)  # noqa: E731
    layer = "model.layers.3."
    expected = {
        "self_attn.q_proj.weight": 0, "self_attn.k_proj.bias": 0, "self_attn.v_proj.weight": 0,
        "self_attn.o_proj.weight": 1, "self_attn.o_proj.bias": None,
        "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1,
        "input_layernorm.weight": None, "post_attention_layernorm.weight": None,
    }
    for name, dim in expected.items():
        assert split_dim(layer + name, embed_split_hidden=True) == dim, name
    assert split_dim("lm_head.weight", True) == 0
    assert split_dim("model.norm.weight", True) is None
    assert split_dim("model.embed_tokens.weight", embed_split_hidden=True) == 1
    assert split_dim("model.embed_tokens.weight", embed_split_hidden=False) == 0


def test_kv_heads_shared_by_several_ranks_are_sliced_to_each_and_merged_once():
    """8 query heads on 2 KV heads at tp=4: ranks 0 and 1 hold KV head 0, ranks 2 and 3 KV head 1."""
    from evods.model import InternLMConfig
    from evods.parallel import TensorParallelSplit

    split = TensorParallelSplit.of(InternLMConfig(hidden_size=24, num_attention_heads=8, num_key_value_heads=2), 4,
                                   embed_split_hidden=True)
    assert split.kv_replicas == 2
    k_proj, q_proj = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    full_k, full_q = torch.arange(6 * 24).view(6, 24), torch.arange(24 * 24).view(24, 24)  # head_dim 3
    k_parts = [split.shard(k_proj, full_k, rank) for rank in range(4)]
    assert [part.tolist() for part in k_parts] == [full_k[:3].tolist()] * 2 + [full_k[3:].tolist()] * 2
    assert torch.equal(split.merge(k_proj, k_parts), full_k)
    q_parts = [split.shard(q_proj, full_q, rank) for rank in range(4)]
    assert [part.shape[0] for part in q_parts] == [6] * 4 and torch.equal(split.merge(q_proj, q_parts), full_q)
    assert (split.replicas(k_proj), split.replicas("model.layers.1.self_attn.v_proj.bias"), split.replicas(q_proj)) \
        == (2, 2, 1)


def test_sizes_that_do_not_split_are_clear_errors():
    from evods.parallel import apply_tensor_parallel

    with pytest.raises(ValueError, match=r"num_attention_heads=4, num_key_value_heads=4 and tensor parallel size 3: 4 "
                                         r"query heads do not split into 3 equal parts \(sizes that fit: 1, 2, 4\)"):
        apply_tensor_parallel(tiny_hf_model(), None, 0, 3, True, True)
    with pytest.raises(ValueError, match="model.embed_tokens.weight has 95 entries along dim 0, which tensor "
                                         "parallel size 2 does not divide"):
        apply_tensor_parallel(tiny_hf_model(vocab_size=95), None, 0, 2, False, True)


def test_tensor_region_generator_differs_per_tensor_rank_only():
    from evods.parallel import tensor_parallel_generator

    draw = lambda tp_rank: torch.rand(4, generator=tensor_parallel_generator(1024, tp_rank))  # noqa: E731
    assert torch.equal(draw(0), draw(0))  # the same tensor rank in another data/pipeline replica
    assert not torch.equal(draw(0), draw(1))
