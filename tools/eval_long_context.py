"""Perplexity by position with origin and with dynamic NTK RoPE: the long-context gain, as a table and a PNG.

The command lives in evods/cli/eval_long_context.py (`evods-eval-long-context` once installed); see `--help`.
"""
import sys

from evods.cli.eval_long_context import main

if __name__ == "__main__":
    sys.exit(main())
