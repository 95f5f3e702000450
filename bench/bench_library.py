"""Real (non-pad) tokens/s on the Alpaca samples, 2 processes: `train_ds.py` with packing against what a user would
pick instead, transformers' Trainer with a padding collator (DataCollatorForSeq2Seq: pad to the longest sample of
the batch, labels -100 on padding) and with DataCollatorWithFlattening (the samples of a batch concatenated into one
row with position_ids). All three train evods' InternLM (hidden 256, 4 layers, V7 vocabulary) in fp32 on the same
samples (samples/alpaca, en + zh, tokenized with tools/alpaca_tokenizer.py's template) with about the same real
tokens per micro-batch: a packed row of --seq_len tokens, or --batch samples. Each variant is a 2-process torchrun
launch; the rounds interleave the variants so that load from other work hits them alike. Prints a markdown table.

    OMP_NUM_THREADS=1 python bench/bench_library.py [--rounds 2] [--steps 8] [--seq_len 1024] [--batch 7]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MICRO_NUM = 2  # micro-batches per step, in every variant
VARIANTS = ("evods", "padding", "flattening")
CONFIG = """
import runpy
globals().update({{k: v for k, v in runpy.run_path({demo!r}).items() if not k.startswith("__")}})
JOB_NAME = "bench_library"
data.update(seq_len={seq_len}, micro_bsz=1, micro_num={micro_num}, total_steps={steps}, train_folder={train!r})
lr_scheduler.update(total_steps={steps})
ckpt = dict(enable_save_ckpt=False)
"""


def prepare(work: Path) -> Path:
    """train/en/alpaca_{en,zh}.bin: the Alpaca samples with the chat template (prompt tokens negative = masked)."""
    from evods.data.alpaca import tokenize_alpaca

    for lang in ("en", "zh"):
        tokenize_alpaca(REPO / "samples" / "alpaca" / f"alpaca_{lang}_demo.json", work / lang,
                        REPO / "tools" / "V7_sft.model", split_ratio=0)
        (work / "train" / "en").mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".meta"):
            shutil.move(work / lang / "train" / "en" / f"dataset.bin{suffix}",
                        work / "train" / "en" / f"alpaca_{lang}.bin{suffix}")
    return work / "train"


def launch(args: list, timeout: int = 1800) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-5000:]}")


def run_evods(config: Path, out: Path) -> list[tuple[float, float]]:
    """(seconds, real tokens) of each step, from train_ds.py's metrics: packed rows hold no padding."""
    launch([str(REPO / "train_ds.py"), "--config", str(config), "--launcher", "torch", "--run_dir", str(out)])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(s["fwd_bwd_time"], s["num_consumed_tokens"] - p["num_consumed_tokens"]) for p, s in zip(steps, steps[1:])]


def run_trainer(variant: str, config: Path, out: Path, batch: int) -> list[tuple[float, float, float]]:
    launch([__file__, "--worker", variant, "--config", str(config), "--batch", str(batch), "--out", str(out)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # (seconds, real tokens, processed tokens) of each step after the first, both ranks' tokens summed
    return [(t, r0 + r1, p0 + p1) for (t, r0, p0), (_, r1, p1) in zip(ranks[0][1:], ranks[1][1:])]


def trainer_worker(variant: str, config_path: str, batch: int, out: str) -> None:
    """One rank of transformers' Trainer (DDP, its default on 2 processes) on the Alpaca samples."""
    import datasets
    import numpy as np
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from evods.checkpoint.formats.hf_tokenizer import write_tokenizer
    from evods.config import load_config
    from evods.data import TokenizedDataset
    from evods.model.chat_templates import INTERNLM
    from evods.model.registry import MODEL_INITIALIZER
    from evods.training.trainer import seed_everything

    cfg = load_config(config_path)
    samples = [TokenizedDataset(path) for path in sorted(Path(cfg.data.train_folder).rglob("*.bin"))]
    tokens = [sample[i] for sample in samples for i in range(len(sample))]
    records = {"input_ids": [np.abs(t).tolist() for t in tokens],
               "labels": [np.where(t > 0, t, -100).tolist() for t in tokens]}  # masked prompt: no loss
    train = datasets.Dataset.from_dict(records)
    counts = {"real": 0, "processed": 0}

    if variant == "padding":
        tokenizer_dir = Path(out) / f"tokenizer{os.environ['RANK']}"
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        write_tokenizer(str(REPO / "tools" / "V7_sft.model"), str(tokenizer_dir), 2048, INTERNLM)
        collator = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(tokenizer_dir), padding=True)
    else:
        collator = DataCollatorWithFlattening()

    def counting_collator(features):
        batch_out = collator(features)
        counts["real"] += sum(len(f["input_ids"]) for f in features)
        counts["processed"] += batch_out["input_ids"].numel()
        return batch_out

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.records, self.last = [], (time.perf_counter(), 0, 0)

        def on_step_end(self, args, state, control, **kwargs):
            now = (time.perf_counter(), counts["real"], counts["processed"])
            self.records.append([now[0] - self.last[0], now[1] - self.last[1], now[2] - self.last[2]])
            self.last = now

    args = TrainingArguments(output_dir=out, max_steps=cfg.data.total_steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=MICRO_NUM, learning_rate=cfg.adam.lr,
                             weight_decay=cfg.adam.weight_decay, max_grad_norm=cfg.hybrid_zero_optimizer.clip_grad_norm,
                             use_cpu=True, ddp_backend="gloo", logging_steps=1, save_strategy="no", report_to=[],
                             dataloader_num_workers=0, disable_tqdm=True)
    seed_everything(1024)
    model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict).float()
    times = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=counting_collator, callbacks=[times])
    trainer.train()
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(times.records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="steps per launch; the first is not timed")
    parser.add_argument("--seq_len", type=int, default=1024, help="evods: tokens per packed row (micro-batch)")
    parser.add_argument("--batch", type=int, default=7, help="Trainer: samples per micro-batch (~154 tokens each)")
    parser.add_argument("--worker", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return trainer_worker(args.worker, args.config, args.batch, args.out)

    work = Path(tempfile.mkdtemp(prefix="bench_library_"))
    train = prepare(work)
    config = work / "config.py"
    config.write_text(CONFIG.format(demo=str(REPO / "configs" / "demo_cpu.py"), seq_len=args.seq_len,
                                    micro_num=MICRO_NUM, steps=args.steps, train=str(train)))
    steps = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        for variant in VARIANTS:
            out = work / f"{variant}{round_index}"
            if variant == "evods":
                steps[variant] += [(t, real, real) for t, real in run_evods(config, out)]
            else:
                steps[variant] += run_trainer(variant, config, out, args.batch)
            print(f"round {round_index}: {variant} done", file=sys.stderr)
    rate = {v: statistics.median(real / t for t, real, _ in steps[v]) for v in VARIANTS}
    print("| run | real tokens/step | padding share | s/step | real tokens/s | evods vs this |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        real = statistics.mean(r for _, r, _ in steps[variant])
        processed = statistics.mean(p for _, _, p in steps[variant])
        seconds = statistics.median(t for t, _, _ in steps[variant])
        print(f"| {variant} | {real:.0f} | {1 - real / processed:.0%} | {seconds:.2f} | {rate[variant]:.0f} | "
              f"{rate['evods'] / rate[variant]:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
