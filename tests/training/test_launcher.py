"""`deepspeed --num_gpus 2 train_ds.py` as a user runs it on CPU (the README's command), watched from outside
(issue: a new user's day): its default output holds none of the lines that look like errors but are none, no line
once per rank, and metrics lines shaped as the README's sample; SIGTERM to the `deepspeed` command alone (not its
process group) stops the ranks with a save; Ctrl-C (SIGINT to the group) says "saving step N…" and "saved", and no
evods process prints a traceback."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit.distributed import free_port
from testkit.paths import REPO

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
START_TIMEOUT, STOP_TIMEOUT = 300, 120
# The demo model, shrunk; the save folder and the run folder are the test's.
CONFIG = """exec(open({demo!r}).read())
model.update(hidden_size=64, num_layers=2, num_attention_heads=4)
data.update(total_steps=10000{data})
lr_scheduler.update(total_steps=10000)
ckpt.update(save_ckpt_folder="local:{save}", checkpoint_every=10000)
"""
# On Hugging Face data tokenized on the fly: sentencepiece and datasets load in the ranks too.
HF_DATA = ", train_dataset=dict(path={path!r})".format(path=str(REPO / "samples" / "pretrain_en" / "c4_demo.jsonl"))
NOISE = ("Setting accelerator to CPU", "Setting CUDA_VISIBLE_DEVICES", "FutureWarning", "absl::InitializeLog",
         "sentencepiece_processor.cc", "Traceback")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+")
README_METRICS = re.compile(r"^\S+ \S+\tINFO trainer\.py:\d+ in _after_step -- (tflops=.*)$", re.M)


def start(tmp_path: Path, data: str = "") -> tuple[subprocess.Popen, Path]:
    """The README's CPU command in its own process group, its output in a file: (the `deepspeed` process, log)."""
    config = tmp_path / "config.py"
    config.write_text(CONFIG.format(demo=str(REPO / "configs" / "demo_cpu.py"), data=data, save=tmp_path / "ckpt"))
    log = tmp_path / "job.log"
    env = {key: value for key, value in os.environ.items() if key != "EVODS_VERBOSE"}
    with open(log, "w") as out:
        job = subprocess.Popen([str(DEEPSPEED), "--quiet", "--num_gpus", "2", "--master_port", str(free_port()),
                                "train_ds.py", "--config", str(config), "--run_dir", str(tmp_path / "run")],
                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    return job, log


def wait_for_steps(job: subprocess.Popen, tmp_path: Path, steps: int) -> None:
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + START_TIMEOUT
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps:
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-5000:]
        time.sleep(0.2)


def wait_until_gone(job: subprocess.Popen) -> float:
    """Seconds until every process of the job's group has exited (the launcher and the ranks are not our
    children); the group is killed and the test fails after STOP_TIMEOUT."""
    start = time.monotonic()
    while True:
        job.poll()  # reap the deepspeed command itself
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - start
        if time.monotonic() - start > STOP_TIMEOUT:
            os.killpg(job.pid, signal.SIGKILL)
            raise AssertionError(f"the job still runs {STOP_TIMEOUT} s after the stop")
        time.sleep(0.2)


def run_and_stop(tmp_path: Path, stop, data: str = "") -> str:
    """Start the job, `stop(job)` it after 2 steps, wait until every process is gone: the job's output."""
    job, log = start(tmp_path, data)
    try:
        wait_for_steps(job, tmp_path, 2)
        stop(job)
        wait_until_gone(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return log.read_text()


def saved_steps(tmp_path: Path) -> list[int]:
    return sorted(int(marker.parent.name) for marker in (tmp_path / "ckpt").glob("*/*.step"))


def messages(output: str) -> list[str]:
    return [TIMESTAMP.sub("", line) for line in output.splitlines() if line.strip()]


def assert_quiet(said: list[str]) -> None:
    """None of the noise, and no line twice (each rank would repeat the start-up lines and the warnings)."""
    assert [line for line in said if any(noise in line for noise in NOISE)] == []
    repeated = {line for line in said if said.count(line) > 1}
    assert repeated == set(), repeated
    assert sum(line.startswith("INFO startup.py") and "initialized seed on rank" in line for line in said) == 1


def test_sigterm_to_the_deepspeed_command_alone_saves_and_stops_and_the_output_is_quiet(tmp_path):
    # the command alone: it dies, its launch.py and the ranks do not hear of it
    output = run_and_stop(tmp_path, lambda job: job.send_signal(signal.SIGTERM), HF_DATA)
    [step] = saved_steps(tmp_path)
    assert step >= 2, output[-3000:]
    said = messages(output)
    assert sum("the launcher that started this job (pid " in line and "is gone" in line for line in said) == 1, output
    assert sum(line.endswith(f"saving step {step}… (a stop was requested; the job ends once it is saved)")
               for line in said) == 1, output
    assert sum(f"saved step {step}: its checkpoint is complete" in line for line in said) == 1, output

    assert_quiet(said)


def test_ctrl_c_says_saving_and_saved_and_no_evods_process_prints_a_traceback(tmp_path):
    output = run_and_stop(tmp_path, lambda job: os.killpg(job.pid, signal.SIGINT))  # what Ctrl-C does
    [step] = saved_steps(tmp_path)
    said = messages(output)
    assert sum("received SIGINT: finishing this step, then saving a checkpoint and stopping" in line
               for line in said) == 1, output
    assert sum(line.endswith(f"saving step {step}… (a stop was requested; the job ends once it is saved)")
               for line in said) == 1, output
    assert sum(f"saved step {step}: its checkpoint is complete" in line and "after the stop request" in line
               for line in said) == 1, output
    # DeepSpeed's `deepspeed` command has no handler of its own for SIGINT on one node: its KeyboardInterrupt
    # traceback is the only one (README, "Stopping, faults and trust")
    if "Traceback (most recent call last):" in output:
        before, runner_traceback = output.split("Traceback (most recent call last):", 1)
        runner_traceback, after = runner_traceback.split("KeyboardInterrupt\n", 1)
        frames = re.findall(r'File "([^"]+)"', runner_traceback)
        # judged by place, not by name: a clone may itself live in a folder called evods
        places = [Path(frame).resolve() for frame in frames]
        ours = [place for place in places if place.is_relative_to(REPO / "evods") or place == REPO / "train_ds.py"]
        assert frames and ours == [], frames
        assert any(frame.endswith("deepspeed/launcher/runner.py") for frame in frames), frames
        said = messages(before + after)
    assert_quiet(said)

    # the README's sample metrics line (of this demo) is one such line: the same keys in the same order, and the
    # values as printed (InternEvo's format: full floats, not rounded)
    readme_line = README_METRICS.search((REPO / "README.md").read_text(encoding="utf-8"))[1]
    printed_line = README_METRICS.search(output)[1]
    readme, printed = (dict(pair.split("=", 1) for pair in line.split(",")) for line in (readme_line, printed_line))
    assert list(readme) == list(printed)
    for key in ("tflops", "loss", "grad_norm", "perplexity"):
        assert len(readme[key].split(".")[1]) >= 6 and len(printed[key].split(".")[1]) >= 6, (readme, printed)
