"""Draw the curves of one or more runs (their metrics.jsonl) as one PNG: loss (and per-type loss), validation loss,
learning rate, gradient norm, tgs and MFU against the step; several runs are overlaid with a legend.

    python tools/plot_metrics.py runs/7b_train/20260101-120000
    python tools/plot_metrics.py runs/a/20260101-120000 runs/b/20260102-090000 --output compare.png
"""
import argparse
import sys
from pathlib import Path

from evods.cli import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders (runs/<JOB_NAME>/<time>, or what --run_dir named) or metrics.jsonl files")
    parser.add_argument("--output", type=Path, default=None,
                        help="the PNG to write (default: metrics.png in the first run folder)")
    args = parser.parse_args(argv)
    from evods.monitor import PlotError, plot_runs  # matplotlib and torch: after the options are read

    def plot():
        first = args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent
        written = plot_runs(args.runs, args.output or first / "metrics.png")
        print(f"wrote the curves of {len(args.runs)} run(s) to {written}")

    return run_cli(plot, (PlotError, OSError), exit_code=2)


if __name__ == "__main__":
    sys.exit(main())
