"""Draw the curves of one or more runs (their metrics.jsonl) as one PNG.

The command lives in evods/cli/plot_metrics.py (`evods-plot-metrics` once installed); see `--help`.
"""
import sys

from evods.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
