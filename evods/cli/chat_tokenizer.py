"""Tokenize conversations into train/valid bin/meta pairs for fine-tuning, in the model's chat format, with only the
assistant's turns (and the end-of-turn token after each) trained.

    python tools/chat_tokenizer.py samples/chat/sharegpt_en_demo.json data/sft --split_ratio 0.1
    python tools/chat_tokenizer.py chats.jsonl data/sft --tokenizer_path tools/tokenizer_internlm2.model \\
        --template internlm2 --type cn --workers 2

Input: a .json list or .jsonl file, or a local Hugging Face dataset (save_to_disk folder, .parquet, or a folder of
data files), of records with "messages" (role/content), ShareGPT "conversations" (from/value) or Alpaca's
instruction/input/output. Output: {output}/train/{type}/{name}.bin(.meta) and {output}/valid/{type}/{name}.bin(.meta),
{name} being the input's name. The ids are those of the exported model folder's `apply_chat_template` (export with
tools/convert2hf.py --tokenizer <the same tokenizer> --chat_template <the same template>).
"""
import argparse
import sys

from evods.cli import run_cli
from evods.data import DataError
from evods.data.chat import OVERLONG, TOKENIZER_TEMPLATE, tokenize_conversations
from evods.model.chat_templates import CHAT_TEMPLATES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_path", help="conversations: .json, .jsonl, or a local Hugging Face dataset")
    parser.add_argument("output_path", help="output folder (train/ and valid/ type folders go under it)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="SentencePiece model (default: tools/V7_sft.model), or a folder with tokenizer.json (a "
                             "Hugging Face tokenizer or model folder)")
    parser.add_argument("--template", choices=(*CHAT_TEMPLATES, TOKENIZER_TEMPLATE), default=None,
                        help="the chat format; 'tokenizer': the tokenizer folder's own chat_template (default: that "
                             "one where the folder has it, else the format whose special tokens the tokenizer has: "
                             "internlm for V7_sft.model, internlm2 for tokenizer_internlm2.model)")
    parser.add_argument("--type", dest="type_name", default="en",
                        help="the type folder of the output (cn, en, code, ...: one type id per folder; default en)")
    parser.add_argument("--split_ratio", type=float, default=0.1, help="share of records for validation (default 0.1)")
    parser.add_argument("--max_length", type=int, default=2048, help="longest conversation in tokens (default 2048)")
    parser.add_argument("--overlong", choices=OVERLONG, default="truncate",
                        help="a longer conversation: truncate (default) keeps it up to the end of its last reply "
                             "within --max_length and drops it if its first reply ends past it; drop drops it")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (output is identical for any N)")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="skip records that are not conversations (a line each on stderr) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def tokenize():
        stats, template = tokenize_conversations(
            args.dataset_path, args.output_path, args.tokenizer_path, template=args.template,
            type_name=args.type_name, split_ratio=args.split_ratio, max_length=args.max_length,
            overlong=args.overlong, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
            overwrite=args.overwrite, progress=not args.quiet)
        print(stats.summary(args.output_path, template, args.max_length), file=sys.stderr)

    return run_cli(tokenize, (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main())
