"""Train evods' InternLM model with transformers' Trainer on evods' packed data (per-document attention, no padding).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/hf_trainer_train.py --config configs/demo_cpu_data.py \\
        --output_dir hf/trainer_demo --deepspeed examples/trainer_zero1.json

The packs come from evods (the same packs as train_ds.py), the batches from `collate_hf`, and everything else is the
Trainer's: its sampler (a seeded shuffle of the packs, not train_ds.py's order), AdamW, a warmup + cosine-to-eta_min
schedule (transformers' cosine_with_min_lr: the warmup starts from 0, InternEvo's from lr / warmup_steps), clipping,
and its loss: the mean over every target token of a step (Trainer's num_items_in_batch), where train_ds.py averages
the micro-batch means. The settings come from an InternEvo config; `--model` starts from a Hugging Face folder.
Without `--deepspeed` the Trainer runs plain DDP (on CPU with gloo).
"""
import argparse
import logging
import sys

import torch

from evods.cli import run_cli
from evods.config import ConfigError, load_config
from evods.data import DataError, build_train_dataset, check_tokenizer_fits, collate_hf, find_tokenizer

logger = logging.getLogger("hf_trainer_train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an InternEvo config: data, optimizer, schedule, model")
    parser.add_argument("--model", help="a Hugging Face folder to start from instead of the config's model")
    parser.add_argument("--output_dir", required=True, help="the Trainer's folder; the final model is saved there")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON (e.g. examples/trainer_zero1.json)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default total_steps)")
    parser.add_argument("--seed", type=int, default=1024)
    return parser.parse_args(argv)


def train(args) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from evods.model import MODEL_INITIALIZER
    from evods.training import seed_everything, trainer_accelerator_config

    cfg = load_config(args.config)
    if cfg.parallel.pipeline.size > 1 or cfg.parallel.tensor.size > 1:
        raise ConfigError(f"{args.config}: parallel.pipeline/tensor > 1 need evods' own engine; run train_ds.py")
    on_cpu = not torch.cuda.is_available()
    # Before TrainingArguments: with --deepspeed on CPU, the process state that counts the ranks (see hf_accelerate).
    accelerator_config = trainer_accelerator_config() if args.deepspeed else {}
    total_steps = args.steps or cfg.data.total_steps
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=total_steps, seed=args.seed,
        per_device_train_batch_size=1,  # one pack (micro_bsz * seq_len tokens, several documents) per micro-batch
        gradient_accumulation_steps=cfg.data.micro_num,
        learning_rate=cfg.adam.lr, weight_decay=cfg.adam.weight_decay, adam_beta1=cfg.adam.adam_beta1,
        adam_beta2=cfg.adam.adam_beta2, adam_epsilon=cfg.adam.adam_eps,
        lr_scheduler_type="cosine_with_min_lr", warmup_steps=cfg.lr_scheduler.warmup_steps,
        # as a rate: with "min_lr" transformers reads optimizer.defaults, which DeepSpeed's ZeRO optimizer lacks
        lr_scheduler_kwargs={"min_lr_rate": cfg.lr_scheduler.eta_min / cfg.adam.lr},
        max_grad_norm=cfg.hybrid_zero_optimizer.clip_grad_norm,  # 0: no clipping
        deepspeed=args.deepspeed, accelerator_config=accelerator_config,
        use_cpu=on_cpu and not args.deepspeed, ddp_backend="gloo" if on_cpu else None,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
    )
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    logger.info("%d processes, %d packs of %d tokens per step", training_args.world_size,
                training_args.world_size * cfg.data.micro_num, cfg.data.seq_len * cfg.data.micro_bsz)
    seed_everything(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model_dict).float()
    tokenizer = cfg.data.train_dataset.tokenizer_path if cfg.data.train_dataset else None  # None: V7_sft.model
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    train_dataset, _ = build_train_dataset(cfg.data)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collate_hf)
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        from evods.checkpoint import write_tokenizer
        from evods.model import chat_template_named

        write_tokenizer(str(find_tokenizer(tokenizer)), args.output_dir, model.config.max_position_embeddings,
                        chat_template_named(model.config.chat_template))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args), (ConfigError, DataError), "hf_trainer_train.py", exit_code=2)


if __name__ == "__main__":
    sys.exit(main())
