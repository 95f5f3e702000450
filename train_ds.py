"""Train an InternLM model from an InternEvo config on DeepSpeed: `deepspeed --num_gpus 8 train_ds.py --config
./configs/7B_sft.py`. The command lives in evods/cli/train.py (`evods-train` once installed); `--help` lists its
options and launchers."""
import sys

from evods.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
