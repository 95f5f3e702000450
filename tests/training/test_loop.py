"""The training loop as users run it: launchers, the metrics line, validation, fp16 loss scaling, clean stops."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evods.training.distributed import LaunchError, set_launcher_env
from evods.training.metrics import QUICKSTART_KEYS, format_metrics_line
from testkit.distributed import run_distributed
from testkit.paths import REPO
from testkit.train_configs import tiny_config

PYTHON = sys.executable


def write_config(folder: Path, body: str) -> Path:
    """A user config that starts from the CPU demo and changes a few keys, as users write them."""
    path = folder / "run_config.py"
    path.write_text(f'exec(open({str(REPO / "configs" / "demo_cpu.py")!r}).read())\n'
                    'model.update(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512)\n'
                    'data.update(seq_len=64)\n'
                    'ckpt.update(enable_save_ckpt=False)\n' + body)
    return path


def test_log_line_keeps_the_quickstart_keys_in_order():
    metrics = {key: index for index, key in enumerate(reversed(QUICKSTART_KEYS))}
    metrics["loss/en"] = 1.0
    line = format_metrics_line(metrics)
    keys = [item.split("=")[0] for item in line.split(",")]
    assert keys == [*QUICKSTART_KEYS, "loss/en"]
    assert line.startswith("tflops=15,step=14,loss=13,tgs (tokens/gpu/second)=12,lr=11,")


def train_and_report(pipeline: int, run_dir: str) -> dict:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    cfg = tiny_config(data=dict(seq_len=64, micro_bsz=1, micro_num=2, total_steps=6, valid_every=3),
                      parallel=dict(pipeline=dict(size=pipeline)), lr_scheduler=dict(total_steps=6),
                      enable_tb=True)
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    state = trainer.train()
    return {"losses": [entry["loss"] for entry in state.history], "log_rank": trainer.engine.is_log_rank,
            "validation": trainer.validate(), "consumed": state.num_consumed_tokens}


@pytest.mark.parametrize("pipeline", [1, 2])
def test_training_writes_metrics_tensorboard_and_validates(tmp_path, pipeline):
    # two ranks: pipeline 1 runs them as two data-parallel ranks, pipeline 2 as two stages
    ranks = run_distributed(train_and_report, world=2, args=(pipeline, str(tmp_path)))
    log_rank = next(rank for rank in ranks if rank["log_rank"])
    losses = log_rank["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert log_rank["consumed"] == 6 * 2 * 64 * (2 // pipeline)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tflops" in r]
    assert [r["step"] for r in steps] == list(range(6))
    first = steps[0]
    assert [k for k in first if k in {key.split(" ")[0] for key in QUICKSTART_KEYS}] == \
        [key.split(" ")[0] for key in QUICKSTART_KEYS]
    assert first["micro_num"] == 2 and first["tflops"] > 0 and first["tgs"] > 0 and first["grad_norm"] > 0
    assert "loss/en" in first and 0 <= first["acc"] <= 1
    validations = [r for r in records if "val/val_loss" in r]
    assert [r["step"] for r in validations] == [3, 6, 6]  # valid_every=3 over 6 steps, then the test's own call
    assert all(math.isfinite(r["val/val_loss"]) for r in validations)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    effective = json.loads((tmp_path / "ds_config.json").read_text())
    assert effective["gradient_accumulation_steps"] == 2 and effective["zero_optimization"]["stage"] == 1
    # every rank of the pipeline computed the same validation loss
    assert all(rank["validation"] == ranks[0]["validation"] for rank in ranks)


def fp16_overflow_run(run_dir: str) -> list[dict]:
    os.environ["EVODS_CPU_FP16"] = "1"
    from evods.training.distributed import init_distributed
    from evods.training.loss import PackedLoss
    from evods.training.trainer import Trainer

    init_distributed("torch")
    cfg = tiny_config(data=dict(seq_len=32, micro_bsz=1, micro_num=2, total_steps=6),
                      model=dict(dtype="torch.float16"), lr_scheduler=dict(total_steps=8, warmup_ratio=0.5),
                      grad_scaler=dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=2), hysteresis=2))
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    overflow_batches = {1, 2}  # the second and third batches overflow

    class OverflowingLoss(PackedLoss):
        calls = 0

        def __call__(self, hidden_states, targets):
            batch = OverflowingLoss.calls // cfg.data.micro_num
            OverflowingLoss.calls += 1
            loss = super().__call__(hidden_states, targets)
            return loss * math.inf if batch in overflow_batches else loss

    trainer.engine.loss_fn = OverflowingLoss(trainer.engine.loss_fn.head, metrics=trainer.token_metrics)
    lrs = []
    original_step = trainer.lr_scheduler.step

    def record_lr():
        original_step()
        lrs.append(trainer.engine.optimizer.param_groups[0]["lr"])

    trainer.lr_scheduler.step = record_lr
    state = trainer.train()
    return {"history": state.history, "skipped": state.inf_nan_skip_batches, "steps": state.step_count, "lrs": lrs}


def test_fp16_overflow_skips_the_step_and_scale_follows_hysteresis(tmp_path):
    result = run_distributed(fp16_overflow_run, world=1, args=(str(tmp_path),))[0]
    history = result["history"]
    applied = [entry["applied"] for entry in history]
    scales = [entry["loss_scale"] for entry in history]
    assert applied == [True, False, False, True, True, True, True, True]
    # hysteresis 2: the first overflow keeps the scale, the second halves it. DeepSpeed then doubles it after
    # growth_interval (2) good steps that follow the first good step, and every 2 good steps after that.
    assert scales == [65536, 65536, 32768, 32768, 32768, 65536, 65536, 131072]
    assert result["skipped"] == 2 and result["steps"] == 6
    # the lr advanced only on the six successful steps: warmup over 4 steps (the logged lr is the next step's)
    assert len(result["lrs"]) == 6
    assert result["lrs"][:3] == pytest.approx([1e-3 * (t + 2) / 4 for t in range(3)])


def skip_batches_run(run_dir: str) -> dict:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    cfg = tiny_config(data=dict(seq_len=32, micro_bsz=1, micro_num=1, total_steps=3, skip_batches="1-2"),
                      lr_scheduler=dict(total_steps=3))
    state = Trainer(cfg, run_dir=Path(run_dir)).train()
    return {"steps": [entry["step"] for entry in state.history], "batches": state.batch_count,
            "skipped": state.skipped_by_config, "optimizer_steps": state.step_count}


def test_skip_batches_consumes_but_does_not_train_those_batches(tmp_path):
    result = run_distributed(skip_batches_run, world=1, args=(str(tmp_path),))[0]
    assert result == {"steps": [0, 3, 4], "batches": 5, "skipped": 2, "optimizer_steps": 3}


def stop_file_run(run_dir: str) -> dict:
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    stop_file = Path(run_dir) / "stop"
    cfg = tiny_config(data=dict(seq_len=32, micro_bsz=1, micro_num=1, total_steps=50),
                      lr_scheduler=dict(total_steps=50),
                      ckpt=dict(enable_save_ckpt=False, stop_file_path=str(stop_file)))
    trainer = Trainer(cfg, run_dir=Path(run_dir))
    written_at_start = stop_file.read_text()
    stop_file.write_text("3")  # what a user writes while the run goes on: stop after step_count 3
    state = trainer.train()
    return {"written_at_start": written_at_start, "optimizer_steps": state.step_count}


def test_stop_file_stops_a_run_that_does_not_save(tmp_path):
    result = run_distributed(stop_file_run, world=1, args=(str(tmp_path),))[0]
    assert result == {"written_at_start": "0", "optimizer_steps": 3}


def test_slurm_launcher_reads_slurm_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_NPROCS": "16", "SLURM_LOCALID": "1"}
    set_launcher_env("slurm", port=9999, environ=environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "16", "1")
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("127.0.0.1", "9999")


@pytest.mark.parametrize("nodelist, first", [("node[01-04,07],gpu5", "node01"), ("gpu5,gpu6", "gpu5"),
                                              ("rack[1-2]-node[3-4]", "rack1-node3"), ("single", "single")])
def test_slurm_master_is_the_first_host_of_the_node_list_without_scontrol(nodelist, first):
    environ = {"SLURM_PROCID": "0", "SLURM_NPROCS": "16", "SLURM_JOB_NODELIST": nodelist}
    set_launcher_env("slurm", environ=environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == (first, "8888")  # InternEvo's default port


def test_slurm_launcher_outside_slurm_says_how_to_start():
    with pytest.raises(LaunchError, match="srun"):
        set_launcher_env("slurm", environ={})


def test_plain_python_gets_a_one_process_group():
    environ = {}
    set_launcher_env("deepspeed", environ=environ)
    assert (environ["RANK"], environ["WORLD_SIZE"]) == ("0", "1") and int(environ["MASTER_PORT"]) > 0


def run_cli(*args, env=None, timeout=240):
    return subprocess.run([*args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("pipeline", [1, 2])
def test_torchrun_launch_trains_two_ranks_and_prints_the_metrics_line(tmp_path, pipeline):
    config = write_config(tmp_path, "data.update(total_steps=2)\nlr_scheduler.update(total_steps=2)\n"
                                    f"parallel.update(pipeline=dict(size={pipeline}))\n")
    result = run_cli(PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_ds.py",
                     "--config", str(config), "--launcher", "torch", "--run_dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data parallel size: {2 // pipeline}, pipeline parallel size: {pipeline}" in result.stderr
    # InternEvo's start-up lines (tests/training/test_startup_log.py), once, from the logging rank (the last stage's:
    # rank 1 under the pipeline); InternEvo's per-rank seeds and New Run lines only with --verbose
    log_rank = pipeline - 1
    assert result.stderr.count("Distributed environment is initialized") == 1
    assert result.stderr.count("initialized seed on rank") == 1
    assert f"initialized seed on rank {log_rank}, numpy: 1024" in result.stderr
    assert result.stderr.count("===========New Run") == 1
    # once per step, from the rank that sees the loss (the last stage under a pipeline, not rank 0)
    assert result.stderr.count("tflops=") == 2


@pytest.mark.parametrize("change, expected", [
    ("data.update(micro_nun=3)", ["micro_nun", "micro_num"]),  # found by the config schema
    ("model.update(hiden_size=64)", ["hiden_size", "run_config.py"]),  # found by the model builder
    ("ckpt.update(enable_save_ckpt=True, save_ckpt_folder='ftp://host/ckpt')", ["accepted forms"]),  # by storage
])
def test_bad_config_is_one_clear_line(tmp_path, change, expected):
    config = write_config(tmp_path, change + "\n")
    result = run_cli(PYTHON, "train_ds.py", "--config", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert all(word in result.stderr for word in expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    config = write_config(tmp_path, "data.update(total_steps=10000)\nlr_scheduler.update(total_steps=10000)\n"
                                    f"ckpt.update(enable_save_ckpt=True, save_ckpt_folder='local:{tmp_path}/ckpt', "
                                    "checkpoint_every=1000)\n")
    process = subprocess.Popen([PYTHON, "train_ds.py", "--config", str(config), "--run_dir", str(tmp_path / "run")],
                               cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    lines = []
    for line in process.stderr:  # wait for the first metrics line, then ask the run to stop
        lines.append(line)
        if "tflops=" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 0, output[-3000:]
    assert "stopped on request" in output
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(len(logged))) and len(logged) < 10000
    # the progress is kept: a complete checkpoint of the last finished step, although checkpoint_every is 1000
    from evods.checkpoint import latest_checkpoint
    from evods.storage import open_storage

    assert latest_checkpoint(open_storage(f"local:{tmp_path}/ckpt")).step == len(logged)
