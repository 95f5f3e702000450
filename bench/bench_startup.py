"""Start-up time, measured from outside the processes: how long `tools/chat.py --help` takes (against a bare
`python -c pass`, run in turn), and how long a 2-rank `deepspeed` launch of the demo model takes until the first
training step's metrics line, with the moments in between (the ranks' first line, the end of their set-up).

    .venv/bin/python bench/bench_startup.py                       # both: 5 pairs of --help, 3 launches
    .venv/bin/python bench/bench_startup.py --only help --runs 10
    .venv/bin/python bench/bench_startup.py --baseline /tmp/old   # each figure also for another checkout of evods
                                                                  # (its tree on PYTHONPATH), in turn with this one

Each figure is printed as min / median / max over the runs; quote the median. With --baseline, the ratio this /
baseline is taken pair by pair (the two run in turn, so a machine that slows down slows both).
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)  # the environment running this script (.venv/bin/python in a clone)
# The demo model for a few steps, without a checkpoint: what a user's first `deepspeed ... train_ds.py` meets.
CONFIG = """exec(open({demo!r}).read())
data.update(total_steps=2)
lr_scheduler.update(total_steps=2)
ckpt.update(enable_save_ckpt=False)
"""
# (name, text that marks the moment in the output), in the order they come
MOMENTS = (("first rank line", "Distributed environment is initialized"), ("set-up done", "run folder: "),
           ("first step", "tflops="))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


def environment(tree: Path) -> dict:
    """Run `tree`'s evods: its folder first on the import path (for this checkout that changes nothing)."""
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def wall_time(command: list[str], tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=tree, env=environment(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def launch_until_first_step(tree: Path, folder: Path) -> dict[str, float]:
    """Seconds from starting `deepspeed --num_gpus 2 train_ds.py` (of `tree`) to each moment of MOMENTS."""
    config = folder / "config.py"
    config.write_text(CONFIG.format(demo=str(tree / "configs" / "demo_cpu.py")))
    command = [str(PYTHON.parent / "deepspeed"), "--quiet", "--num_gpus", "2", "--master_port", str(free_port()),
               "train_ds.py", "--config", str(config), "--run_dir", str(folder / "run")]
    seen: dict[str, float] = {}
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=tree, env=environment(tree), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for line in job.stdout:
        for name, text in MOMENTS:
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - start
    job.wait()
    if job.returncode or len(seen) < len(MOMENTS):
        raise SystemExit(f"the launch in {tree} failed (exit code {job.returncode}, saw {sorted(seen)})")
    return seen


def first_step(tree: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="evods-startup-") as folder:
        return launch_until_first_step(tree, Path(folder))


def report(name: str, runs: dict[Path, list[float]], baseline: Path | None) -> None:
    line = f"{name + ':':34} {spread(runs[ROOT])}"
    if baseline is not None:
        ratios = [this / other for this, other in zip(runs[ROOT], runs[baseline])]
        line += f"; baseline {spread(runs[baseline])}; ratio median {statistics.median(ratios):.2f}x"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("help", "first_step"), default=None)
    parser.add_argument("--runs", type=int, default=None, help="default: 5 for --help, 3 launches")
    parser.add_argument("--baseline", type=Path, default=None, help="another evods tree, measured in turn")
    args = parser.parse_args()
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    if args.only in (None, "help"):
        runs = args.runs or 5
        helps: dict[Path, list[float]] = {tree: [] for tree in trees}
        bare = []
        for _ in range(runs + 1):  # the first round warms the file cache and is not counted
            for tree in trees:
                helps[tree].append(wall_time([str(PYTHON), "tools/chat.py", "--help"], tree))
            bare.append(wall_time([str(PYTHON), "-c", "pass"], ROOT))
        print(f"python -c pass:                     {spread(bare[1:])}")
        report("tools/chat.py --help", {tree: times[1:] for tree, times in helps.items()}, args.baseline)
    if args.only in (None, "first_step"):
        launches = {tree: [] for tree in trees}
        for _ in range(args.runs or 3):
            for tree in trees:
                launches[tree].append(first_step(tree))
        for name, _ in MOMENTS:
            report(f"launch to {name}", {tree: [seen[name] for seen in launches[tree]] for tree in trees},
                   args.baseline)


if __name__ == "__main__":
    sys.exit(main())
