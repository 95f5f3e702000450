"""Start-up time, measured from outside the processes: how long `tools/chat.py --help` takes (against a bare
`python -c pass`, run in turn), and how long a 2-rank `deepspeed` launch of the demo model takes until the first
training step's metrics line, with the moments in between (the ranks' first line, their New Run line).

    .venv/bin/python bench/bench_startup.py                  # both, 5 and 3 runs
    .venv/bin/python bench/bench_startup.py --only help --runs 10

Each figure is printed as min / median / max over the runs; quote the median.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
# The demo model for a few steps, without a checkpoint: what a user's first `deepspeed ... train_ds.py` meets.
CONFIG = """exec(open({demo!r}).read())
data.update(total_steps=2)
lr_scheduler.update(total_steps=2)
ckpt.update(enable_save_ckpt=False)
"""
# (name, text that marks the moment in the output), in the order they come
MOMENTS = (("first rank line", "Distributed environment is initialized"), ("New Run", "===========New Run"),
           ("first step", "tflops="))


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def bench_help(runs: int) -> None:
    helps, bares = [], []
    for _ in range(runs + 1):  # the first pair warms the file cache and is not counted
        helps.append(wall_time([str(PYTHON), "tools/chat.py", "--help"]))
        bares.append(wall_time([str(PYTHON), "-c", "pass"]))
    helps, bares = helps[1:], bares[1:]
    ratios = [help_s / bare_s for help_s, bare_s in zip(helps, bares)]
    print(f"tools/chat.py --help: {spread(helps)} (min / median / max over {runs} runs)")
    print(f"python -c pass:       {spread(bares)}")
    print(f"ratio, pair by pair:  median {statistics.median(ratios):.1f}x")


def launch_until_first_step(folder: Path) -> dict[str, float]:
    """Seconds from starting `deepspeed --num_gpus 2 train_ds.py` to each moment of MOMENTS."""
    config = folder / "config.py"
    config.write_text(CONFIG.format(demo=str(ROOT / "configs" / "demo_cpu.py")))
    command = [str(ROOT / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "train_ds.py", "--config", str(config),
               "--run_dir", str(folder / "run")]
    seen: dict[str, float] = {}
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in job.stdout:
        for name, text in MOMENTS:
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - start
    job.wait()
    if job.returncode or len(seen) < len(MOMENTS):
        raise SystemExit(f"the launch failed (exit code {job.returncode}, saw {sorted(seen)})")
    return seen


def bench_first_step(runs: int) -> None:
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="evods-startup-") as folder:
            results.append(launch_until_first_step(Path(folder)))
    for name, _ in MOMENTS:
        print(f"launch to {name + ':':16} {spread([result[name] for result in results])} (over {runs} launches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("help", "first_step"), default=None)
    parser.add_argument("--runs", type=int, default=None, help="default: 5 for --help, 3 launches")
    args = parser.parse_args()
    if args.only in (None, "help"):
        bench_help(args.runs or 5)
    if args.only in (None, "first_step"):
        bench_first_step(args.runs or 3)


if __name__ == "__main__":
    sys.exit(main())
