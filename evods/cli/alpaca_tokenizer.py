"""Tokenize an Alpaca dataset into train/valid bin/meta pairs with the InternLM chat template.

    python tools/alpaca_tokenizer.py /path/to/alpaca_dataset /path/to/output_dataset /path/to/tokenizer \
        --split_ratio 0.1

Writes {output}/train/en/dataset.bin(.meta) and {output}/valid/en/dataset.bin(.meta). The dataset is an Alpaca JSON
(or JSONL) file, or a folder saved with datasets' save_to_disk.
"""
import argparse
import sys

from evods.cli import run_cli
from evods.data import DataError
from evods.data.alpaca import tokenize_alpaca
from evods.data.tokenizer_model import find_tokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_path", help="Alpaca JSON list of {instruction, input, output}, or a saved HF dataset")
    parser.add_argument("output_path", help="output folder")
    parser.add_argument("tokenizer_path", help="SentencePiece model (InternLM's V7_sft.model), or a Hugging Face "
                        "tokenizer folder with tokenizer.json (or the file) that has InternLM's <eoh>, <eoa> and "
                        "<0x0A> pieces")
    parser.add_argument("--split_ratio", type=float, default=0.1, help="share of samples for validation (default 0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--internevo_special_ids", action="store_true",
                        help="write <eoh>/<eoa> as InternEvo's tool does (103167/103166, unused pieces in "
                             "V7_sft.model) instead of the tokenizer's real pieces, for .bin files byte-identical to "
                             "InternEvo's")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def tokenize():
        counts = tokenize_alpaca(args.dataset_path, args.output_path, find_tokenizer(args.tokenizer_path),
                                 args.split_ratio, args.overwrite, args.internevo_special_ids)
        print(f"wrote {counts['train']} train and {counts['valid']} valid samples under {args.output_path}",
              file=sys.stderr)

    return run_cli(tokenize, (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main())
