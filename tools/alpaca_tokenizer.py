"""Tokenize an Alpaca dataset into train/valid bin/meta pairs with the InternLM chat template.

The command lives in evods/cli/alpaca_tokenizer.py (`evods-alpaca-tokenizer` once installed); see `--help`.
"""
import sys

from evods.cli.alpaca_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
