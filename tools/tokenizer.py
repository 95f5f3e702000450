"""Tokenize pretraining text (txt, jsonl, json, or a local Hugging Face dataset) into an InternEvo bin/meta pair.

The command lives in evods/cli/tokenizer.py (`evods-tokenizer` once installed); see `--help`.
"""
import sys

from evods.cli.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
