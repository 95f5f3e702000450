"""How long a stop takes: Ctrl-C (SIGINT to the launcher's process group) during the demo's training, until the
checkpoint's step marker is written and until every process of the job has exited.

    .venv/bin/python bench/stop_latency.py                 # the demo config, signal during a step
    .venv/bin/python bench/stop_latency.py --validation    # validation after every step; signal during it

The job is `deepspeed --num_gpus 2 train_ds.py --config configs/demo_cpu.py` with a save folder of its own. The
DeepSpeed launcher kills ranks 30 s after forwarding the signal, so the signal-to-marker time must stay well below.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(job: subprocess.Popen) -> bool:
    """Whether any process of the job's group still runs (the launcher and the ranks are not our children)."""
    job.poll()  # reap the `deepspeed` command itself: a zombie would count as alive
    try:
        os.killpg(job.pid, 0)
    except ProcessLookupError:
        return False
    return True


def measure(folder: Path, after_steps: int, validation: bool) -> dict:
    config = folder / "config.py"
    config.write_text(f"exec(open({str(ROOT / 'configs' / 'demo_cpu.py')!r}).read())\n"
                      "data.update(total_steps=10000" + (", valid_every=1" if validation else "") + ")\n"
                      "lr_scheduler.update(total_steps=10000)\n"
                      f"ckpt.update(save_ckpt_folder='local:{folder}/ckpt', checkpoint_every=10000)\n")
    command = [str(ROOT / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "train_ds.py", "--config", str(config), "--run_dir", str(folder / "run")]
    log = open(folder / "job.log", "w")
    job = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return stop_and_time(job, folder, after_steps, validation, log)
    finally:
        if group_alive(job):  # the benchmark itself was interrupted: leave no job behind
            os.killpg(job.pid, signal.SIGKILL)


def stop_and_time(job: subprocess.Popen, folder: Path, after_steps: int, validation: bool, log) -> dict:
    metrics = folder / "run" / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < after_steps:
        if job.poll() is not None:
            raise SystemExit(f"the job ended before step {after_steps}: see {folder / 'job.log'}")
        time.sleep(0.05)
    if validation:  # the validation after that step (250 batches of the demo's random set, minutes) is under way
        time.sleep(3)
    signalled = time.monotonic()
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    marker_at = None
    while group_alive(job):
        if marker_at is None and list((folder / "ckpt").glob("*/*.step")):
            marker_at = time.monotonic()
        time.sleep(0.02)
    if marker_at is None and list((folder / "ckpt").glob("*/*.step")):
        marker_at = time.monotonic()
    job.wait()
    log.close()
    steps = [path.parent.name for path in (folder / "ckpt").glob("*/*.step")]
    return {"signal_to_marker_s": None if marker_at is None else round(marker_at - signalled, 2),
            "of_which_save_s": save_seconds(folder / "job.log"),
            "signal_to_exit_s": round(time.monotonic() - signalled, 2), "deepspeed_rc": job.returncode,
            "checkpoint_steps": steps}


def save_seconds(log: Path) -> float | None:
    """From the logging rank's lines: 'saving step N…' to 'checkpoint of step N is complete'."""
    stamps = {}
    for line in log.read_text().splitlines():
        for key, words in (("start", "-- saving step "), ("end", "is complete:")):
            if words in line and line[:4].isdigit():
                stamps[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return round((stamps["end"] - stamps["start"]).total_seconds(), 2) if len(stamps) == 2 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--after_steps", type=int, default=3, help="metrics lines to wait for before the signal")
    parser.add_argument("--validation", action="store_true", help="validate after every step; signal during it")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="evods-stop-") as folder:
            result = measure(Path(folder), args.after_steps, args.validation)
        print(f"run {attempt + 1}: {result}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
