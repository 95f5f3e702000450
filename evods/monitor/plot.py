"""Loss-curve pictures: the metrics.jsonl of one or more run folders as one PNG (tools/plot_metrics.py)."""
import json
import math
from datetime import datetime
from pathlib import Path

# (title, y label, the record keys drawn in that panel): a key ending in "*" is a prefix
PANELS = (
    ("loss", "loss", ("loss", "loss/*")),
    ("validation loss", "loss", ("val/*_loss",)),
    ("learning rate", "lr", ("lr",)),
    ("gradient norm", "grad_norm", ("grad_norm",)),
    ("throughput", "tokens/gpu/second", ("tgs",)),
    ("MFU", "model FLOPs utilisation", ("mfu",)),
)
FIGURE_SIZE_IN, DPI = (15, 8), 100  # 1500 × 800 pixels
# The folders train_ds.py makes for a run: runs/{JOB_NAME}/{launch time in this format} (trainer.default_run_dir).
RUN_TIME_FORMAT = "%Y%m%d-%H%M%S"


class PlotError(ValueError):
    """A run folder without metrics."""


def metrics_file(run: Path) -> Path:
    """The metrics.jsonl of a run folder (or the file itself)."""
    path = run if run.is_file() else run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl here; give a run folder (runs/<JOB_NAME>/<time>, or --run_dir)")
    return path


def read_series(path: Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every finite number in the file. A step logged twice (a resumed run that went back
    to its checkpoint) keeps its latest value."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = record.get("step")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series.setdefault(key, {})[step] = value
    return series


def _matches(key: str, pattern: str) -> bool:
    if "*" not in pattern:
        return key == pattern
    head, tail = pattern.split("*")
    return key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail)


def run_label(run: Path) -> str:
    """'demo_cpu 2026-12-03 10:31:35' for runs/demo_cpu/20261203-103135 (job name and launch time); the folder's
    name for a folder named otherwise (--run_dir)."""
    folder = run if run.is_dir() else run.parent
    try:
        launched = datetime.strptime(folder.name, RUN_TIME_FORMAT)
    except ValueError:
        return folder.name
    return f"{folder.parent.name} {launched:%Y-%m-%d %H:%M:%S}"


def run_labels(runs: list[Path]) -> list[str]:
    """Names telling the runs apart: job name and launch time, or the folder name, with its parent's when names
    repeat."""
    labels = [run_label(run) for run in runs]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{(run if run.is_dir() else run.parent).parent.name}/{label}" for run, label in zip(runs, labels)]


def plot_runs(runs: list[Path], output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    all_series = [read_series(metrics_file(run)) for run in runs]
    figure, axes = plt.subplots(2, 3, figsize=FIGURE_SIZE_IN, dpi=DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, ylabel, patterns) in zip(axes.flat, PANELS):
        drawn = 0
        for index, (label, series) in enumerate(zip(run_labels(runs), all_series)):
            keys = [key for pattern in patterns for key in sorted(series) if _matches(key, pattern)]
            for key_index, key in enumerate(keys):
                steps = sorted(series[key])
                name = label if key_index == 0 and key == patterns[0] else f"{label} {key}"
                axis.plot(steps, [series[key][s] for s in steps], color=colors[index % len(colors)],
                          linestyle="-" if key_index == 0 else ("--", ":", "-.")[(key_index - 1) % 3],
                          marker="o" if len(steps) == 1 else None, linewidth=1.2, label=name)
                drawn += 1
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if drawn:
            axis.legend(fontsize=7, loc="best")
        else:
            axis.text(0.5, 0.5, "not in these runs", ha="center", va="center", transform=axis.transAxes,
                      color="0.5")
    figure.suptitle(", ".join(run_labels(runs)))
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
    return output
