"""Train evods' InternLM model with a plain Hugging Face accelerate loop (DeepSpeed plugin, ZeRO-1) on evods' packed
data, and save a folder that `from_pretrained` loads.

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_zero1.yaml \\
        examples/accelerate_train.py --config configs/demo_cpu_data.py --output_dir hf/accelerate_demo

The run settings (data, micro_num, AdamW, InternEvo's warmup + cosine LR, clipping, steps) come from an InternEvo
config, so the loop computes what `train_ds.py --config` computes: same initial weights (the same seed before the
model is built), same packs in the same order on each rank (PackedLoader), same optimizer, schedule and clipping
(DeepSpeed's), and the same loss (the token mean of each micro-batch; DeepSpeed averages the micro_num micro-batches
of a step). `--model` starts from a Hugging Face folder instead of the config's model, `--data` trains on another
train_folder or Hugging Face dataset. Precision is the accelerate config's `mixed_precision` (the model is fp32).
With `parallel.tensor` > 1 in the config, the model is split by evods' tensor parallelism (ZeRO-1 only).
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from evods.cli import run_cli
from evods.config import ConfigError, adamw_kwargs, load_config
from evods.data import (
    DataError,
    PackedLoader,
    build_train_dataset,
    check_tokenizer_fits,
    find_tokenizer,
    open_hf_dataset,
    packed_dataset,
)
from evods.training import LaunchError

logger = logging.getLogger("accelerate_train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an InternEvo config: data, optimizer, schedule, model")
    parser.add_argument("--model", help="a Hugging Face folder to start from instead of the config's model")
    parser.add_argument("--data", help="instead of the config's data: a train_folder (<type>/*.bin) or a Hugging "
                                       "Face dataset (save_to_disk folder, parquet/jsonl files, Hub name)")
    parser.add_argument("--streaming", action="store_true", help="read the --data Hugging Face dataset as a stream")
    parser.add_argument("--text_key", default="text", help="the text column of a --data Hugging Face dataset")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the config's "
                                                         "data.train_dataset.tokenizer_path, else tools/V7_sft.model)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default total_steps)")
    parser.add_argument("--seed", type=int, default=1024, help="seed before the model is built (train_ds.py's)")
    parser.add_argument("--output_dir", default=None, help="where to save the trained model as a HF folder")
    parser.add_argument("--metrics_file", default=None, help="also write each step's metrics as a JSON line here")
    return parser.parse_args(argv)


def build_model(cfg, hf_folder: str | None, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from evods.model import MODEL_INITIALIZER
    from evods.training import seed_everything

    seed_everything(seed)
    if hf_folder:
        return AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    return MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict).float()


def build_dataset(cfg, args):
    data = cfg.data
    if args.data is None:
        return build_train_dataset(data)[0]
    if Path(args.data).is_dir() and any(Path(args.data).rglob("*.bin")):
        return packed_dataset(args.data, data.seq_len, data.micro_bsz, pack_sample_into_one=data.pack_sample_into_one)
    source = open_hf_dataset(args.data, streaming=args.streaming)
    return packed_dataset(source, data.seq_len, data.micro_bsz, pack_sample_into_one=data.pack_sample_into_one,
                          tokenizer=args.tokenizer, text_key=args.text_key)


def train(args) -> None:
    from evods.config import check_topology
    from evods.parallel import apply_tensor_parallel, build_parallel_grid, gather_tensor_parallel_state_dict
    from evods.training import Beta2Scheduler, LRScheduler, deepspeed_accelerator, deepspeed_with_mpu

    cfg = load_config(args.config)
    if cfg.parallel.pipeline.size > 1:
        raise ConfigError(f"{args.config}: parallel.pipeline > 1 needs DeepSpeed's pipeline engine; run train_ds.py")
    if cfg.loss.label_smoothing:
        raise ConfigError(f"{args.config}: loss.label_smoothing: transformers' causal-LM loss has none; set it to 0")
    micro_num, total_steps, tp = cfg.data.micro_num, args.steps or cfg.data.total_steps, cfg.parallel.tensor.size
    accelerator = deepspeed_accelerator(micro_num, cfg.hybrid_zero_optimizer.clip_grad_norm, tensor_parallel=tp,
                                        saves_model=args.output_dir is not None)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    logger.info("%d processes (rank %d), DeepSpeed ZeRO stage %s, tensor parallel %d", accelerator.num_processes,
                accelerator.process_index, accelerator.deepspeed_plugin.zero_stage, tp)
    # evods' process groups (InternEvo's rank layout); with parallel.tensor = 1 every process is a data rank
    layout = check_topology(cfg, accelerator.num_processes, accelerator.process_index)
    grid = build_parallel_grid(layout)

    model = build_model(cfg, args.model, args.seed)
    tokenizer = args.tokenizer or (cfg.data.train_dataset.tokenizer_path if cfg.data.train_dataset else None)
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    apply_tensor_parallel(model, grid.get_tensor_model_parallel_group(), layout.tp_rank, tp,
                          cfg.model.embed_split_hidden, parallel_output=False)  # full logits for transformers' loss
    loader = PackedLoader(build_dataset(cfg, args), micro_num, rank=layout.dp_rank, world=layout.dp)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw_kwargs(cfg))
    with deepspeed_with_mpu(grid):
        model, optimizer = accelerator.prepare(model, optimizer)  # model: the DeepSpeed engine
    lr_schedule = LRScheduler(optimizer, cfg.adam.lr, cfg.lr_scheduler)  # InternEvo's warmup + cosine
    beta2_schedule = Beta2Scheduler(optimizer, cfg.beta2_scheduler)
    metrics_file = open(args.metrics_file, "a") if args.metrics_file and accelerator.is_main_process else None

    batches = iter(loader)
    for step in range(total_steps):
        start, losses, tokens = time.perf_counter(), [], 0
        for _ in range(micro_num):
            batch = {name: tensor.to(accelerator.device) for name, tensor in next(batches).items()}
            with accelerator.accumulate(model):  # DeepSpeed steps (and clips) after the micro_num-th backward
                loss = model(**batch).loss
                accelerator.backward(loss)
            losses.append(loss.detach())
            tokens += batch["input_ids"].numel()  # packed rows hold no padding: every token is real
        if model.was_step_applied():  # DeepSpeed skips a step with inf/nan gradients (fp16)
            lr_schedule.step()
            beta2_schedule.step()
        loss = accelerator.reduce(torch.stack(losses).mean(), "mean")
        all_tokens = accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum") / tp
        seconds = time.perf_counter() - start
        record = {"step": step, "loss": loss.item(), "grad_norm": float(model.get_global_grad_norm()),
                  "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": all_tokens.item() / seconds}
        logger.info(" ".join(f"{name}={value:.6g}" for name, value in record.items()))
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
    if metrics_file:
        metrics_file.close()

    if args.output_dir:
        unwrapped = accelerator.unwrap_model(model)
        # whole weights; both are collectives, which every rank joins
        state_dict = gather_tensor_parallel_state_dict(unwrapped, grid.get_tensor_model_parallel_group(),
                                                       cfg.model.embed_split_hidden) if tp > 1 \
            else accelerator.get_state_dict(model)  # ZeRO-3 gathers its partitions
        if accelerator.is_main_process:
            from evods.checkpoint import write_tokenizer
            from evods.model import chat_template_named

            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
            write_tokenizer(str(find_tokenizer(tokenizer)), args.output_dir, unwrapped.config.max_position_embeddings,
                            chat_template_named(unwrapped.config.chat_template))
            logger.info("saved the model to %s (AutoModelForCausalLM.from_pretrained loads it)", args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args), (ConfigError, DataError, LaunchError), "accelerate_train.py", exit_code=2)


if __name__ == "__main__":
    sys.exit(main())
