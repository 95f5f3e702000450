"""Train an InternLM model from an InternEvo config on DeepSpeed.

    deepspeed --num_gpus 8 train_ds.py --config ./configs/7B_sft.py
    torchrun --nproc_per_node 8 train_ds.py --config ./configs/7B_sft.py --launcher torch
    srun -N 2 -n 16 --ntasks-per-node 8 python train_ds.py --config ./configs/7B_sft.py --launcher slurm

Installed with pip, without a clone: `deepspeed --num_gpus 8 --module evods.cli.train --config my_config.py`
(torchrun: `-m evods.cli.train`); `evods-train --config my_config.py` runs one process.
"""
import argparse
import sys
from pathlib import Path

from evods.console import set_verbose
from evods.training.distributed import LAUNCHERS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an InternEvo-style Python config, e.g. configs/7B_sft.py")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed",
                        help="who started the processes (deepspeed and torch read RANK/WORLD_SIZE; slurm reads "
                             "SLURM_*)")
    parser.add_argument("--port", type=int, default=None, help="master port for --launcher slurm (default 8888)")
    parser.add_argument("--seed", type=int, default=1024)
    parser.add_argument("--run_dir", default=None, help="where metrics, TensorBoard and the DeepSpeed JSON go "
                                                         "(default runs/<JOB_NAME>/<time>)")
    parser.add_argument("--ds_config", default=None, help="a DeepSpeed JSON merged over the one derived from --config")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="per-device peak for MFU when the device is not in evods' table")
    parser.add_argument("--profiling", action="store_true",
                        help="trace a few steps after warm-up with the torch profiler into <run folder>/traces")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything: every rank's lines and the libraries' warnings that are hidden by "
                             "default (the same as EVODS_VERBOSE=1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by deepspeed
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verbose:
        set_verbose()
    # torch, DeepSpeed and transformers load only now: `--help` and a mistyped option answer at once
    from evods.checkpoint import CheckpointError
    from evods.cli import run_cli
    from evods.config import ConfigError, load_config
    from evods.data import DataError
    from evods.storage import StorageError
    from evods.training.distributed import LaunchError
    from evods.training.trainer import run

    def train():
        cfg = load_config(args.config)
        run(cfg, launcher=args.launcher, port=args.port, run_dir=Path(args.run_dir) if args.run_dir else None,
            seed=args.seed, ds_config_override=args.ds_config, peak_tflops=args.peak_tflops, profiling=args.profiling)

    # A mistake in the config, data, storage or launch: one line that says what to fix, not a traceback per rank.
    return run_cli(train, (ConfigError, DataError, CheckpointError, StorageError, LaunchError), exit_code=2)


if __name__ == "__main__":
    sys.exit(main())
