"""train_ds.py --profiling and tools/plot_metrics.py on one real run folder (issue: watching a run)."""
import json
import os
import re
import runpy
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evods.monitor import plot_runs
from testkit.paths import REPO

LINEAR_LAYERS = [f"model.layers.{layer}.{block}.{proj}" for layer in range(2)
                 for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      ("mlp", ("gate_proj", "up_proj", "down_proj"))) for proj in projs] + ["lm_head"]
FIRST_RUN_COLOR = (31, 119, 180)  # matplotlib's first colour (tab:blue)
SECOND_RUN_COLOR = (255, 127, 14)  # tab:orange


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> tuple[Path, str]:
    """A 1-process run of 8 steps with validation after step 6 (outside the profiled steps, 3 and 4), MFU (for an
    assumed 1 TFLOP/s peak) and --profiling."""
    folder = tmp_path_factory.mktemp("profiled")
    config = folder / "run_config.py"
    config.write_text(f'exec(open({str(REPO / "configs" / "demo_cpu.py")!r}).read())\n'
                      'model.update(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512)\n'
                      'data.update(seq_len=64, total_steps=8, valid_every=6)\n'
                      'lr_scheduler.update(total_steps=8)\n'
                      'ckpt.update(enable_save_ckpt=False)\n')
    result = subprocess.run([sys.executable, "train_ds.py", "--config", str(config), "--run_dir", str(folder / "run"),
                             "--profiling", "--peak_tflops", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", result.stderr


def test_profiling_writes_a_chrome_trace_naming_the_linear_layers(profiled_run):
    run_dir, log = profiled_run
    traces = list((run_dir / "traces").glob("rank0_dp0_pp0_tp0.*.pt.trace.json"))
    assert len(traces) == 1, list((run_dir / "traces").iterdir())
    trace = json.loads(traces[0].read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert set(LINEAR_LAYERS) <= names, sorted(set(LINEAR_LAYERS) - names)
    assert "aten::mm" in names or "aten::addmm" in names
    summary = next(line for line in log.splitlines() if "profiling: trace in" in line)
    assert str(traces[0]) in summary and "top operators by self CPU time: " in summary
    assert len(re.findall(r"[\d.]+% \([\d.]+ ms\)", summary)) == 5 and "aten::" in summary


def loss_panel(image: np.ndarray) -> np.ndarray:
    """The top-left sixth of the 2 × 3 grid."""
    height, width, _ = image.shape
    return image[:height // 2, :width // 3]


def pixels_of(region: np.ndarray, color: tuple) -> int:
    return int((np.abs(region[..., :3].astype(int) - color).sum(axis=-1) < 30).sum())


def plot_metrics_main():
    """tools/plot_metrics.py's main(argv), run in this process (a new one would import torch again)."""
    return runpy.run_path(str(REPO / "tools" / "plot_metrics.py"))["main"]


def test_plot_metrics_draws_the_curves_of_one_or_several_runs(profiled_run, tmp_path, capsys):
    run_dir, _ = profiled_run
    assert plot_metrics_main()([str(run_dir)]) == 0
    picture = run_dir / "metrics.png"
    assert str(picture) in capsys.readouterr().out
    image = np.asarray(Image.open(picture).convert("RGB"))
    assert image.shape == (800, 1500, 3)
    assert pixels_of(loss_panel(image), FIRST_RUN_COLOR) > 200, "the loss panel has no curve"

    # a second run, overlaid in the next colour
    other = tmp_path / "other_run"
    other.mkdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    halved = [{key: value / 2 if key.startswith("loss") else value for key, value in record.items()}
              for record in records]
    (other / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in halved))
    image = np.asarray(Image.open(plot_runs([run_dir, other], tmp_path / "both.png")).convert("RGB"))
    assert pixels_of(loss_panel(image), FIRST_RUN_COLOR) > 200 and pixels_of(loss_panel(image), SECOND_RUN_COLOR) > 200


def test_plot_metrics_says_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tools/plot_metrics.py"])  # errors are named after the command that ran
    assert plot_metrics_main()([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("plot_metrics.py: ") and "no metrics.jsonl" in error


def test_runs_are_labelled_by_job_name_and_launch_time(tmp_path):
    from evods.monitor.plot import run_labels
    from evods.training.trainer import default_run_dir

    first = tmp_path / default_run_dir("demo_cpu", datetime(2026, 12, 3, 10, 31, 35))
    second = tmp_path / default_run_dir("demo_cpu_data", datetime(2026, 12, 4, 9, 15, 0))
    for folder in (first, second, tmp_path / "a" / "my_run", tmp_path / "b" / "my_run"):
        folder.mkdir(parents=True)
    assert run_labels([first, second]) == ["demo_cpu 2026-12-03 10:31:35", "demo_cpu_data 2026-12-04 09:15:00"]
    assert run_labels([first / "metrics.jsonl", tmp_path / "a" / "my_run"]) == ["demo_cpu 2026-12-03 10:31:35",
                                                                               "my_run"]
    assert run_labels([tmp_path / "a" / "my_run", tmp_path / "b" / "my_run"]) == ["a/my_run", "b/my_run"]
