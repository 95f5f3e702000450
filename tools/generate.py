"""Generate from a Hugging Face folder written by tools/convert2hf.py (greedy, with the KV cache).

The command lives in evods/cli/generate.py (`evods-generate` once installed); see `--help`.
"""
import sys

from evods.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
