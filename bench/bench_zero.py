"""Memory per rank and step time of DeepSpeed ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload (parallel.zero).

A ~110M-parameter InternLM (hidden 768, 12 layers, 12 heads, vocabulary 16,384), fp32 weights with fp32 master
copies and AdamW, trained by evods' Trainer on 4 ranks (data parallel), one packed row of 512 tokens per rank and
step. Each variant runs in its own 4 processes:
- memory, from torch's own allocation records (the profiler's memory events; a process's RSS would mostly show
  start-up and the allocator's caching), from just before the model is built to the end of the second step: what a
  rank holds after the step (weights, gradients, optimizer states and DeepSpeed's buffers: the model, gradient and
  optimizer state) and its peak (activations and transient buckets included). Under offload, the part
  DeepSpeed keeps in its host-side buffers (the optimizer's fp32 shards, their gradients and Adam states; with
  parameter offload the parameter shards too) is counted apart: on a GPU it leaves the device. On this CPU machine
  everything is host memory, so offload changes where the bytes would be, not how many;
- step time: the median of the steps after the second, without the profiler.

    OMP_NUM_THREADS=1 python bench/bench_zero.py [--steps 5] [--ranks 4]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.allocations import profiled_training  # noqa: E402
from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)
from testkit.train_configs import tiny_config  # noqa: E402

MODEL = dict(hidden_size=768, num_layers=12, num_attention_heads=12, vocab_size=16384, mlp_ratio=8 / 3,
             dtype="torch.float32")
VARIANTS = {
    "ZeRO-1": dict(stage=1),
    "ZeRO-2": dict(stage=2),
    "ZeRO-3": dict(stage=3),
    "ZeRO-2 + offload optimizer": dict(stage=2, offload_optimizer=True),
    "ZeRO-3 + offload optimizer": dict(stage=3, offload_optimizer=True),
    "ZeRO-3 + offload optimizer and parameters": dict(stage=3, offload_optimizer=True, offload_param=True),
}
MiB = 2**20


def offloaded_bytes(trainer, zero: dict) -> int:
    """Bytes of the state DeepSpeed keeps in host buffers under offload: the optimizer's fp32 shards, their gradients
    and Adam states (stage 2: the parameters of the optimizer it wraps; stage 3: its flat fp32 partitions and the flat
    gradient partition buffer, deepspeed/runtime/zero/stage3.py); with parameter offload also the model's parameter
    shards."""
    import torch

    storages = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    engine = trainer.engine.engine
    if zero.get("offload_optimizer"):
        if zero["stage"] == 3:
            shards, inner = list(engine.optimizer.fp32_partitioned_groups_flat), engine.optimizer.optimizer
            add(engine.optimizer.grad_partitions_flat_buffer)
        else:
            inner = engine.basic_optimizer
            shards = [param for group in inner.param_groups for param in group["params"]]
        for shard in shards:
            add(shard)
            add(shard.grad)
            for value in inner.state.get(shard, {}).values():
                add(value)
    if zero.get("offload_param"):
        for param in engine.module.parameters():
            add(getattr(param, "ds_tensor", None))
    return sum(storages.values())


def measure(zero: dict, steps: int, root: str) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    cfg = tiny_config(model=MODEL, data=dict(seq_len=512, micro_bsz=1, micro_num=1, total_steps=steps + 2,
                                             num_worker=0),
                      parallel=dict(zero1=-1, zero=zero), lr_scheduler=dict(total_steps=steps + 2, warmup_ratio=0.0))
    trainer, peak, held, step = profiled_training(cfg, Path(root) / "run", steps)
    return {"peak": peak, "held": held, "offloaded": offloaded_bytes(trainer, zero),
            "step": step, "parameters": trainer.num_parameters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()
    results = {}
    for name, zero in VARIANTS.items():
        with tempfile.TemporaryDirectory() as root:
            results[name] = run_distributed(measure, world=args.ranks, args=(zero, args.steps, root),
                                            timeout=600 + 120 * args.steps)
        print(f"{name}: done", file=sys.stderr)
    parameters = results["ZeRO-1"][0]["parameters"]
    print(f"model {MODEL}: {parameters / 1e6:.1f}M parameters, {args.ranks} ranks, one row of 512 tokens per rank, "
          f"AdamW\n")
    base = results["ZeRO-1"]
    base_held, base_step = max(r["held"] for r in base), max(r["step"] for r in base)
    print("| run | held after a step, MiB (max over ranks) | ratio | of which in host buffers under offload, MiB | "
          "on the accelerator, MiB | ratio | peak, MiB | ratio | s/step (median) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_peak = max(r["peak"] for r in base)
    for name, ranks in results.items():
        held, peak = max(r["held"] for r in ranks), max(r["peak"] for r in ranks)
        offloaded = max(r["offloaded"] for r in ranks)
        resident = max(r["held"] - r["offloaded"] for r in ranks)
        step = max(r["step"] for r in ranks)
        print(f"| {name} | {held / MiB:.0f} | {held / base_held:.2f} | {offloaded / MiB:.0f} | {resident / MiB:.0f} | "
              f"{resident / base_held:.2f} | {peak / MiB:.0f} | {peak / base_peak:.2f} | {step:.2f} | "
              f"{step / base_step:.2f} |")


if __name__ == "__main__":
    main()
