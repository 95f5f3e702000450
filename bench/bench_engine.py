"""DeepSpeed engine overhead: one evods ZeRO-1 rank vs a plain torch AdamW loop on the same model and batch, and
a 2-stage pipeline on two processes vs one process. Prints a markdown table; compare ratios measured in one run.

    OMP_NUM_THREADS=1 python bench/bench_engine.py [--steps 6] [--seq_len 512]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)

MODEL = dict(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=103168, mlp_ratio=8 / 3)


def make_batch(seq_len: int, rows: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (rows, seq_len), generator=generator)
    positions = torch.arange(seq_len).repeat(rows, 1)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, dims=1), "type_ids": ids * 0}


def build_model():
    import torch

    from evods.model.registry import MODEL_INITIALIZER

    torch.manual_seed(0)
    return MODEL_INITIALIZER.get_module("INTERNLM")(**MODEL, dtype=torch.float32)


def timed_steps(step, steps: int) -> float:
    step()  # warm-up: lazy imports, allocator
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_torch(seq_len: int, rows: int, steps: int) -> float:
    import torch

    from evods.training.loss import PackedLoss

    torch.set_num_threads(1)
    model, batch = build_model(), make_batch(seq_len, rows)
    loss_fn = PackedLoss(model.lm_head)  # applies the head, as TrainEngine's loss does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        for i in range(rows):
            hidden = model(input_ids=batch["input_ids"][i:i + 1], position_ids=batch["position_ids"][i:i + 1],
                           skip_lm_head=True).last_hidden_state
            (loss_fn(hidden, (batch["labels"][i:i + 1], batch["type_ids"][i:i + 1])) / rows).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def evods_engine(pipeline: int, seq_len: int, rows: int, steps: int) -> float:
    import torch
    import torch.distributed as dist

    from evods.parallel import parallel_layout
    from evods.training.distributed import init_distributed
    from evods.training.engine import TrainEngine
    from evods.training.loss import PackedLoss

    init_distributed("torch")
    layout = parallel_layout(dist.get_rank(), dist.get_world_size(), pp=pipeline, tp=1)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": rows, "train_batch_size": rows,
                 "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    model = build_model()
    engine = TrainEngine(model, lambda params: torch.optim.AdamW(params, lr=1e-4), ds_config, layout,
                         PackedLoss(model.lm_head))
    batch = make_batch(seq_len, rows)
    return timed_steps(lambda: engine.train_step(batch), steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4, help="micro-batches per step")
    args = parser.parse_args()
    common = (args.seq_len, args.rows, args.steps)
    torch_time = run_distributed(plain_torch, world=1, args=common)[0]
    zero1_time = run_distributed(evods_engine, world=1, args=(1, *common))[0]
    pipe_time = max(run_distributed(evods_engine, world=2, args=(2, *common)))
    print(f"model {MODEL}, {args.rows} micro-batches of {args.seq_len} tokens per step, fp32, 1 thread per process\n")
    print("| run | s/step | ratio |")
    print("|---|---|---|")
    print(f"| plain torch AdamW loop, 1 process | {torch_time:.3f} | 1.00 |")
    print(f"| evods TrainEngine, ZeRO-1, 1 rank | {zero1_time:.3f} | {zero1_time / torch_time:.2f} (goal <= 1.10) |")
    print(f"| evods pipeline, 2 stages on 2 processes | {pipe_time:.3f} | {pipe_time / zero1_time:.2f} vs 1 rank |")


if __name__ == "__main__":
    main()
