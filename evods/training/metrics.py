"""The metrics line of the quickstart, plus the JSONL file and TensorBoard scalars in the run folder."""
import json
import logging
import math
from pathlib import Path

from evods.console import log_level

# InternEvo's logging format (record_current_batch_training_metrics in internlm/train/training_internlm.py), so
# tools that parse its logs parse ours.
LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s in %(funcName)s -- %(message)s"

# The quickstart log line's keys, in its order; extra metrics follow them.
QUICKSTART_KEYS = (
    "tflops", "step", "loss", "tgs (tokens/gpu/second)", "lr", "loss_scale", "grad_norm", "micro_num",
    "num_consumed_tokens", "inf_nan_skip_batches", "num_samples_in_batch", "largest_length", "largest_batch",
    "smallest_batch", "adam_beta2", "fwd_bwd_time",
)

logger = logging.getLogger("evods")


def setup_logging(rank: int) -> None:
    """Rank 0 logs info; the other ranks only errors (everything with EVODS_VERBOSE=1), so that a 1000-GPU run
    prints one line per step and no line once per rank (evods.console)."""
    logging.basicConfig(format=LOG_FORMAT, level=log_level(rank), force=True)


def ordered_metrics(metrics: dict) -> list[tuple[str, object]]:
    known = [(k, metrics[k]) for k in QUICKSTART_KEYS if k in metrics]
    extra = [(k, v) for k, v in metrics.items() if k not in QUICKSTART_KEYS]
    return known + extra


def format_metrics_line(metrics: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in ordered_metrics(metrics))


def scalar_name(key: str) -> str:
    """'tgs (tokens/gpu/second)' → 'tgs': names usable in TensorBoard and JSON consumers."""
    return key.split(" ")[0]


class MetricsSink:
    """Appends one JSON object per step to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard_dir: Path | None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, step: int, metrics: dict) -> None:
        record = {scalar_name(k): v for k, v in metrics.items()}
        record.setdefault("step", step)  # the training line carries its own step, in the quickstart's position
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
