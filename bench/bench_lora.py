"""Memory per rank and step time of LoRA against full fine-tuning of the same model, at tensor size 1 and 2.

An InternLM of ~44M parameters (hidden 512, 8 layers, 8 heads, vocabulary 16,384), fp32 weights, AdamW under
DeepSpeed ZeRO-1 (fp32 master partitions), trained by evods' Trainer on one packed row of 512 tokens per step; LoRA
with r=8 on all seven projections. tp=1 runs in one process, tp=2 in two (tensor ranks). Per variant:
- optimizer state: the bytes of the ZeRO-1 optimizer's fp32 master partitions and Adam's two moments on a rank
  (the storages of the optimizer DeepSpeed wraps: its parameters and their state);
- held and peak: torch's own allocation records (the profiler's memory events) from just before the model is built
  to the end of the second step (what a rank holds after a step; the peak with activations and gradients);
- step time: the median of the steps after the second, without the profiler.

    OMP_NUM_THREADS=1 python bench/bench_lora.py [--steps 3]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.allocations import profiled_training  # noqa: E402
from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)
from testkit.train_configs import tiny_config  # noqa: E402

MODEL = dict(hidden_size=512, num_layers=8, num_attention_heads=8, vocab_size=16384, mlp_ratio=8 / 3,
             dtype="torch.float32")
LORA = dict(r=8, lora_alpha=16)
VARIANTS = {  # name: (tensor size, lora)
    "full fine-tuning, tp=1": (1, None),
    "LoRA r=8, tp=1": (1, LORA),
    "full fine-tuning, tp=2": (2, None),
    "LoRA r=8, tp=2": (2, LORA),
}
MiB = 2**20


def optimizer_state_bytes(trainer) -> int:
    """The storages of the optimizer DeepSpeed's ZeRO-1 wraps: its fp32 master partitions and their Adam states."""
    import torch

    inner = trainer.engine.engine.optimizer.optimizer
    storages = {}
    for group in inner.param_groups:
        for param in group["params"]:
            for tensor in (param, *inner.state.get(param, {}).values()):
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def measure(tp: int, lora: dict | None, steps: int, root: str) -> dict:
    from evods.training.distributed import init_distributed

    init_distributed("torch")
    cfg = tiny_config(model=MODEL, data=dict(seq_len=512, micro_bsz=1, micro_num=1, total_steps=steps + 2,
                                             num_worker=0),
                      parallel=dict(zero1=-1, tensor=dict(size=tp)),
                      lr_scheduler=dict(total_steps=steps + 2, warmup_ratio=0.0), lora=lora)
    trainer, peak, held, step = profiled_training(cfg, Path(root) / "run", steps)
    trained = sum(p.numel() for p in trainer.engine.engine.module.parameters() if p.requires_grad)
    return {"peak": peak, "held": held, "optimizer": optimizer_state_bytes(trainer), "trained": trained,
            "step": step, "parameters": trainer.num_parameters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for name, (tp, lora) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as root:
            results[name] = run_distributed(measure, world=tp, args=(tp, lora, args.steps, root),
                                            timeout=600 + 120 * args.steps)
        print(f"{name}: done", file=sys.stderr)
    parameters = results["full fine-tuning, tp=1"][0]["parameters"]
    print(f"model {MODEL}: {parameters / 1e6:.1f}M parameters, one row of 512 tokens per step, AdamW, ZeRO-1; "
          f"LoRA {LORA} on all projections\n")
    print("| run | trained parameters per rank | optimizer state, MiB (max over ranks) | ratio to full at the same tp |"
          " held after a step, MiB | ratio | peak, MiB | ratio | s/step (median) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        full = results[name.replace(f"LoRA r={LORA['r']}", "full fine-tuning")]
        worst = {key: max(rank[key] for rank in ranks) for key in ("optimizer", "held", "peak", "step", "trained")}
        base = {key: max(rank[key] for rank in full) for key in ("optimizer", "held", "peak", "step")}
        print(f"| {name} | {worst['trained'] / 1e6:.2f}M | {worst['optimizer'] / MiB:.1f} | "
              f"{worst['optimizer'] / base['optimizer']:.3f} | {worst['held'] / MiB:.0f} | "
              f"{worst['held'] / base['held']:.2f} | {worst['peak'] / MiB:.0f} | {worst['peak'] / base['peak']:.2f} | "
              f"{worst['step']:.2f} | {worst['step'] / base['step']:.2f} |")


if __name__ == "__main__":
    main()
