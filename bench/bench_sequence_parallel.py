"""Activation memory and step time of tensor parallelism (TP=2) with and without sequence parallelism.

One training step (forward, backward, DeepSpeed ZeRO-1 AdamW step) of a model with hidden 512, 8 layers, 8 heads on
one packed row of 4,096 tokens (8 documents of 512), fp32, on 2 ranks. Prints markdown tables:
- memory, each variant in its own pair of processes, from torch's own allocation records (the profiler's memory
  events; a process's peak RSS would mostly show start-up and the allocator's caching): the peak above the step's
  start of the forward + backward (activations and gradients) and of the whole step (the optimizer's update
  included), and the bytes autograd holds for backward at the end of the forward, by module kind;
- step time, both variants built in the same two processes, their steps interleaved (median).

    OMP_NUM_THREADS=1 python bench/bench_sequence_parallel.py [--vocab 103168] [--recompute] [--steps 5]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.allocations import allocator_peak  # noqa: E402
from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)

MODEL = dict(hidden_size=512, num_layers=8, num_attention_heads=8, mlp_ratio=3)
TOKENS, DOCUMENTS = 4096, 8
VARIANTS = {"TP=2": False, "TP=2 + sequence parallel": True}
MiB = 2**20


def make_batch(vocab: int) -> dict:
    import torch

    ids = torch.randint(3, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(TOKENS // DOCUMENTS).repeat(DOCUMENTS)[None]
    return {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, dims=1), "type_ids": ids * 0}


def build_engine(sequence_parallel: bool, vocab: int, recompute: bool):
    """An evods TrainEngine over a TP=2 model, the same weights for both variants."""
    import torch
    import torch.distributed as dist

    from evods.model.modeling_internlm import set_activation_checkpointing
    from evods.model.registry import MODEL_INITIALIZER
    from evods.parallel import VocabParallelLogits, apply_tensor_parallel, build_parallel_grid, parallel_layout
    from evods.training.engine import TrainEngine
    from evods.training.loss import PackedLoss

    layout = parallel_layout(dist.get_rank(), dist.get_world_size(), pp=1, tp=2, sequence_parallel=sequence_parallel)
    grid = build_parallel_grid(layout)
    group = grid.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    model = MODEL_INITIALIZER.get_module("INTERNLM")(**MODEL, vocab_size=vocab, dtype=torch.float32)
    apply_tensor_parallel(model, group, layout.tp_rank, layout.tp, embed_split_hidden=True, parallel_output=True,
                          sequence_parallel=layout.sequence_parallel)
    set_activation_checkpointing(model, recompute)
    # DeepSpeed's ZeRO-1 stages gradients in a reduce_bucket_size buffer allocated every step (2 GiB at evods'
    # default of InternEvo's 512 Mi elements); a bucket of the model's size keeps that constant out of the peak.
    bucket = sum(p.numel() for p in model.parameters())
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                 "zero_optimization": {"stage": 1, "reduce_bucket_size": bucket}, "gradient_clipping": 1.0,
                 "steps_per_print": 10**9}
    # The whole logits (loss.kernel="full"), as when BENCHMARKS.md's sequence-parallel rows were measured; the
    # default chunked loss would take the logits out of both variants' peaks.
    loss_fn = PackedLoss(model.lm_head, vocab=VocabParallelLogits(group, layout.sequence_parallel), kernel="full")
    return TrainEngine(model, lambda params: torch.optim.AdamW(params, lr=1e-4), ds_config, layout, loss_fn, grid)


def saved_for_backward(engine, batch) -> dict:
    """Bytes autograd keeps for backward after one forward, by the innermost module kind that saved them (each
    storage counted once; parameters, which live in DeepSpeed's flat buffer, left out)."""
    import torch

    kinds = {"InternLMRMSNorm": "norms", "InternLMAttention": "attention", "InternLMMLP": "mlp"}
    stack = ["other"]
    storages = {p.untyped_storage().data_ptr(): None for p in engine.engine.module.parameters()}

    def enter(module, args):
        stack.append(kinds.get(type(module).__name__, stack[-1]))

    def leave(module, args, output):
        stack.pop()

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (stack[-1], storage.nbytes()))
        return tensor

    handles = [h for m in engine.engine.module.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = engine.engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               skip_lm_head=True).last_hidden_state
        loss = engine.loss_fn(hidden, (batch["labels"], batch["type_ids"]))
    for handle in handles:
        handle.remove()
    del hidden, loss
    totals = dict.fromkeys(["norms", "attention", "mlp", "other"], 0)
    for kind, nbytes in filter(None, storages.values()):
        totals[kind] += nbytes
    return totals


def measure_memory(sequence_parallel: bool, vocab: int, recompute: bool) -> dict:
    """The step of TrainEngine.train_step (one micro-batch), profiled in two windows: forward + backward, then the
    optimizer's step; the whole step's peak is the larger of the first window's and the second's above where the
    first ended."""
    from torch.profiler import ProfilerActivity, profile

    from evods.training.distributed import init_distributed

    init_distributed("torch")
    engine = build_engine(sequence_parallel, vocab, recompute)
    batch = make_batch(vocab)
    engine.train_step(batch)  # warm-up: optimizer state and DeepSpeed buffers exist before the measured step
    saved = saved_for_backward(engine, batch) if not recompute else None
    model = engine.engine
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as forward_backward:
        hidden = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       skip_lm_head=True).last_hidden_state
        loss = engine.loss_fn(hidden, (batch["labels"], batch["type_ids"]))
        del hidden
        model.backward(loss)
        del loss
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as update:
        model.step()
    activations, held = allocator_peak(forward_backward)
    return {"forward_backward": activations, "step": max(activations, held + allocator_peak(update)[0]),
            "saved": saved}


def measure_time(vocab: int, recompute: bool, steps: int) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    engines = {name: build_engine(sp, vocab, recompute) for name, sp in VARIANTS.items()}
    batch = make_batch(vocab)
    times = {name: [] for name in engines}
    for step in range(steps + 1):  # step 0 warms up
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.train_step(batch)
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=103168)
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing of every layer")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip_time", action="store_true")
    args = parser.parse_args()
    memory = {name: run_distributed(measure_memory, world=2, args=(sp, args.vocab, args.recompute))
              for name, sp in VARIANTS.items()}
    print(f"model {MODEL}, vocab {args.vocab}, one row of {TOKENS} tokens ({DOCUMENTS} documents), fp32, TP=2, "
          f"activation checkpointing {'on' if args.recompute else 'off'}\n")
    base = memory["TP=2"]
    print("| run | forward + backward peak, MiB (rank 0 / 1) | ratio | whole-step peak, MiB (rank 0 / 1) | ratio |")
    print("|---|---|---|---|---|")
    for name, ranks in memory.items():
        cells = []
        for window in ("forward_backward", "step"):
            peaks = " / ".join(f"{r[window] / MiB:.0f}" for r in ranks)
            ratio = max(r[window] for r in ranks) / max(r[window] for r in base)
            cells += [peaks, f"{ratio:.2f}"]
        print(f"| {name} | {' | '.join(cells)} |")
    if not args.recompute:
        print("\nSaved for backward at the end of the forward, rank 0, MiB:\n")
        kinds = list(base[0]["saved"])
        print(f"| run | {' | '.join(kinds)} | total |")
        print("|---" * (len(kinds) + 2) + "|")
        for name, ranks in memory.items():
            saved = ranks[0]["saved"]
            cells = " | ".join(f"{saved[k] / MiB:.0f}" for k in kinds)
            print(f"| {name} | {cells} | {sum(saved.values()) / MiB:.0f} |")
    if not args.skip_time:
        times = run_distributed(measure_time, world=2, args=(args.vocab, args.recompute, args.steps),
                                timeout=300 + 120 * args.steps)  # a step takes tens of seconds on 2 CPU cores
        slowest = {name: max(rank[name] for rank in times) for name in VARIANTS}
        print(f"\n| run | s/step (median of {args.steps}, interleaved) | ratio |")
        print("|---|---|---|")
        for name, seconds in slowest.items():
            print(f"| {name} | {seconds:.3f} | {seconds / slowest['TP=2']:.2f} |")


if __name__ == "__main__":
    main()
