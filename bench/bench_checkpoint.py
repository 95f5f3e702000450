"""Checkpoint throughput and the training stall of a background (async) save.

    OMP_NUM_THREADS=2 python bench/bench_checkpoint.py --hidden 768 --layers 2 --out /tmp/bench_ckpt

Trains a one-process model with ZeRO-1 (weights + fp32 Adam states are the model state, ~16 bytes per parameter),
then measures: raw disk write speed (dd), a synchronous local save and a load through the CheckpointManager, and the
time a save keeps the training loop waiting with async_upload to the moto S3 server versus a synchronous S3 save.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dd_write_speed(folder: Path, size_mb: int) -> float:
    target = folder / "dd.bin"
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mb}", "conv=fsync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    target.unlink()
    return size_mb / elapsed


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/evods_bench_ckpt")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from evods.checkpoint.resume.plan import ALL_CONTENT, LoadPlan
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer
    from testkit.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, create_bucket, start_moto_server
    from testkit.train_configs import tiny_config

    init_distributed("torch")
    os.environ.update(S3_ACCESS_KEY_ID=ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY_ID=SECRET_ACCESS_KEY)
    server = start_moto_server()
    host, port = server.get_host_and_port()

    def trainer(save_folder: str, **ckpt) -> Trainer:
        cfg = tiny_config(data=dict(seq_len=32, micro_bsz=1, micro_num=1, total_steps=1),
                          model=dict(hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=8,
                                     vocab_size=32000, mlp_ratio=8 / 3, dtype="torch.float32"),
                          lr_scheduler=dict(total_steps=10, warmup_ratio=0.1),
                          ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=save_folder, auto_resume=False, **ckpt))
        run = Trainer(cfg, run_dir=out / "run")
        run.engine.train_step(next(iter(run.loader)))  # one step, so that Adam has its states
        return run

    local = trainer(f"local:{out}/local")
    start = time.perf_counter()
    local.checkpoints.saver.save("100", 100, local._checkpoint_parts())
    save_s = time.perf_counter() - start
    size = folder_mb(out / "local" / "100")
    reload = Trainer(local.cfg, run_dir=out / "run")  # auto_resume=False: load it explicitly
    reload.checkpoints.loader.plan = LoadPlan(f"local:{out}/local", "100", ALL_CONTENT, "evods", "benchmark")
    start = time.perf_counter()
    reload.checkpoints.loader.restore(reload._checkpoint_parts())
    load_s = time.perf_counter() - start
    dd = dd_write_speed(out, int(size))
    print(f"model state {size:.0f} MiB: local save {size / save_s:.0f} MiB/s ({save_s:.2f} s), load "
          f"{size / load_s:.0f} MiB/s ({load_s:.2f} s); dd with fsync {dd:.0f} MiB/s")

    stalls = {}
    for mode, async_upload in (("sync", False), ("async", True)):
        bucket = create_bucket(f"http://{host}:{port}")
        run = trainer(f"boto3:s3://{bucket}.{host}:{port}/bench", async_upload=async_upload,
                      async_upload_tmp_folder=str(out / "upload_tmp"))
        start = time.perf_counter()
        run.checkpoints.saver.save("200", 200, run._checkpoint_parts())
        stalls[mode] = time.perf_counter() - start
        run.checkpoints.saver.close()
    print(f"S3 save stall: synchronous {stalls['sync']:.2f} s, async {stalls['async']:.2f} s "
          f"({100 * stalls['async'] / stalls['sync']:.0f}% of synchronous; goal <= 20%)")
    server.stop()


if __name__ == "__main__":
    main()
