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
from pathlib import Path

from evods.checkpoint import CheckpointError, write_tokenizer
from evods.cli import run_cli
from evods.data import DataError, find_tokenizer
from evods.data.chat import OVERLONG, render_conversations, tokenize_conversations
from evods.model import CHAT_TEMPLATES, ChatTemplate
from evods.model.chat_templates import check_tokenizer, tokens_missing

TOKENIZER_TEMPLATE = "tokenizer"  # --template: the tokenizer folder's own chat_template
MAX_LENGTH_UNCHECKED = 10**9  # tokenizer_config's model_max_length: the tool applies its own max_length


def prepare_tokenizer(tokenizer_path, template_name: str | None, folder: str):
    """(the tokenizer an export writes for `tokenizer_path`, written into `folder` and loaded, the ChatTemplate).
    `template_name`: a name of evods.model.chat_templates or "tokenizer" (a tokenizer folder's own chat_template);
    None: a tokenizer folder's own template, else the registry template whose special tokens the tokenizer has."""
    choices = f"{', '.join(CHAT_TEMPLATES)} or {TOKENIZER_TEMPLATE}"
    if template_name is not None and template_name not in (*CHAT_TEMPLATES, TOKENIZER_TEMPLATE):
        raise DataError(f"--template {template_name!r}: use {choices}")
    source = Path(tokenizer_path) if tokenizer_path is not None and Path(tokenizer_path).is_dir() \
        else find_tokenizer(tokenizer_path)
    try:  # without a template: the folder's own stays, and the choice below is checked once
        tokenizer = write_tokenizer(str(source), folder, MAX_LENGTH_UNCHECKED, None)
    except CheckpointError as error:
        raise DataError(str(error)) from None
    own = tokenizer.chat_template if source.is_dir() else None
    if own is not None and not isinstance(own, str):
        raise DataError(f"{source} has several named chat templates; give --template {', '.join(CHAT_TEMPLATES)}")
    if template_name in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[template_name]
    elif own:  # --template tokenizer, or no --template for a folder with its own
        # an evods export's own template is one of the registry's: call it by its name
        template = next((t for t in CHAT_TEMPLATES.values() if t.jinja == own), None) or \
            ChatTemplate(TOKENIZER_TEMPLATE, own, "", (), f"the chat_template of {source}")
        _check_generation_prompt(tokenizer, template.jinja, source)
    elif template_name == TOKENIZER_TEMPLATE:
        raise DataError(f"--template {TOKENIZER_TEMPLATE}: {source} has no chat_template of its own; use "
                        f"{', '.join(CHAT_TEMPLATES)}")
    else:
        fitting = [name for name, candidate in CHAT_TEMPLATES.items() if not tokens_missing(candidate, tokenizer)]
        if len(fitting) != 1:
            raise DataError(f"cannot tell the chat format of {source} (its tokens fit "
                            f"{', '.join(fitting) or 'no template'}): give --template {choices}")
        template = CHAT_TEMPLATES[fitting[0]]
    try:
        check_tokenizer(template, tokenizer, f"the tokenizer {source}")
    except ValueError as error:
        raise DataError(f"--template {template.name}: {error}") from None
    return tokenizer, template


def _check_generation_prompt(tokenizer, jinja: str, source) -> None:
    """A reply starts where the generation prompt ends: a template that writes none would train the header of every
    reply."""
    asked = [[{"role": "user", "content": "?"}]]
    if render_conversations(tokenizer, jinja, asked, True) == render_conversations(tokenizer, jinja, asked, False):
        raise DataError(f"the chat_template of {source} writes nothing for add_generation_prompt, so the replies "
                        f"cannot be told from their headers; give --template {', '.join(CHAT_TEMPLATES)}")


def tokenize_chat(dataset_path, output_path, tokenizer_path=None, template=None, **options):
    """tools/chat_tokenizer.py: (evods.data.chat.tokenize_conversations' counts, the template's name); `options` are
    tokenize_conversations' keywords."""
    chosen = None

    def tokenizer_files(folder):
        nonlocal chosen
        tokenizer, chosen = prepare_tokenizer(tokenizer_path, template, folder)
        return tokenizer, chosen.jinja

    stats = tokenize_conversations(dataset_path, output_path, tokenizer_files, **options)
    return stats, chosen.name


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
        stats, template = tokenize_chat(
            args.dataset_path, args.output_path, args.tokenizer_path, args.template,
            type_name=args.type_name, split_ratio=args.split_ratio, max_length=args.max_length,
            overlong=args.overlong, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
            overwrite=args.overwrite, progress=not args.quiet)
        print(stats.summary(args.output_path, template, args.max_length), file=sys.stderr)

    return run_cli(tokenize, (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main())
