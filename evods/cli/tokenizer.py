"""Tokenize pretraining text (txt, jsonl, json, or a local Hugging Face dataset) into an InternEvo bin/meta pair.

    python tools/tokenizer.py --text_input_path raw_data.txt --bin_output_path cn/output.bin
    python tools/tokenizer.py --text_input_path my_hf_dataset/ --text_key content --bin_output_path en/output.bin

The default encoding is the quickstart's (raw SentencePiece, no BOS/EOS); --add_bos/--add_eos give later InternEvo's.
A Hugging Face tokenizer (--tokenizer_path a folder with tokenizer.json, or the file) encodes the same way, with the
BOS/EOS it defines (Llama-3's <|begin_of_text|> and <|end_of_text|>).
"""
import argparse
import sys

from evods.cli import run_cli
from evods.data import DataError
from evods.data.tokenize import tokenize_file
from evods.data.tokenizer_model import find_tokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_input_path", required=True,
                        help="input .txt (one sample per line), .jsonl or .json; or a local Hugging Face dataset: a "
                             "save_to_disk folder, a .parquet file, or a folder of parquet/jsonl files")
    parser.add_argument("--bin_output_path", required=True, help="output .bin; the meta goes to <this>.meta")
    parser.add_argument("--tokenizer_path", default=None,
                        help="SentencePiece model (default: tools/V7_sft.model, InternLM's V7 tokenizer shipped "
                             "with evods), or a Hugging Face tokenizer: a folder with tokenizer.json (e.g. Llama-3's) "
                             "or the tokenizer.json file, read from disk only")
    parser.add_argument("--text_key", default="text",
                        help="json/jsonl field or dataset column to tokenize (default: text)")
    parser.add_argument("--whole_record", action="store_true",
                        help="json/jsonl: tokenize the whole serialized record, as InternEvo does")
    parser.add_argument("--add_bos", action="store_true", help="prepend BOS to every sample")
    parser.add_argument("--add_eos", action="store_true", help="append EOS to every sample")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (output is identical for any N)")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="count and skip lines with invalid UTF-8 or malformed JSON instead of failing")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing output")
    existing.add_argument("--append", action="store_true", help="add the samples after an existing output's")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def tokenize():
        mode = "overwrite" if args.overwrite else "append" if args.append else "create"
        stats = tokenize_file(args.text_input_path, args.bin_output_path, find_tokenizer(args.tokenizer_path),
                              text_key=args.text_key, whole_record=args.whole_record, add_bos=args.add_bos,
                              add_eos=args.add_eos, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                              mode=mode, progress=not args.quiet)
        print(stats.summary(args.bin_output_path), file=sys.stderr)

    return run_cli(tokenize, (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main())
