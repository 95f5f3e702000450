"""The quickstart's long-context claim, measured: perplexity of a text by position bucket (0-L, L-2L, 2L-4L for
L = max_position_embeddings), with plain ("origin") RoPE and with dynamic NTK RoPE; prints a table and writes a PNG.

    python tools/eval_long_context.py --model demo_out/hf_long --text data/long/heldout.txt

Each bucket [a, b) is scored as generation meets it: the model reads a window's first b tokens and the loss is taken
on positions a..b-1. Dynamic NTK should match origin below L and stay low past it, where origin RoPE degrades.
"""
import argparse
import sys
from pathlib import Path

from evods.cli import run_cli
from evods.cli.chat import add_model_options
from evods.cli.model_folder import check_not_a_training_checkpoint
from evods.inference import InferenceError, load_for_inference
from evods.inference.loading import check_folder, load_tokenizer
from evods.inference.long_context import bucket_bounds, evaluate_long_context, plot_long_context, text_windows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, rotary_type=False)
    parser.add_argument("--text", type=Path, required=True, help="a UTF-8 text file, ideally one the model never saw")
    parser.add_argument("--lengths", default="1,2,4",
                        help="bucket ends as multiples of max_position_embeddings (default 1,2,4)")
    parser.add_argument("--max_windows", type=int, default=None,
                        help="score at most this many windows of the text (default: all that fit)")
    parser.add_argument("--output", type=Path, default=Path("long_context.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate(args), (InferenceError, OSError))


def evaluate(args) -> None:
    try:
        multiples = [float(m) for m in args.lengths.split(",")]
    except ValueError:
        raise InferenceError(f"--lengths {args.lengths!r}: give multiples of max_position_embeddings, e.g. 1,2,4") \
            from None
    if args.max_windows is not None and args.max_windows < 1:
        raise InferenceError("give --max_windows >= 1")
    if not args.text.is_file():
        raise InferenceError(f"--text {args.text}: no such file")
    check_not_a_training_checkpoint(args.model)
    # the text's windows before the weights load: a text too short is told at once
    positions = check_folder(Path(args.model))["max_position_embeddings"]
    bounds = bucket_bounds(positions, multiples)
    tokenizer = load_tokenizer(Path(args.model), args.trust_remote_code)
    token_ids = tokenizer(args.text.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    windows = text_windows(token_ids, tokenizer.bos_token_id, bounds[-1], args.max_windows)
    model, _ = load_for_inference(args.model, None, args.dtype, args.device, args.trust_remote_code)
    print(f"{args.model}: max_position_embeddings {positions}; {args.text} ({len(token_ids)} tokens) in "
          f"{len(windows)} window(s) of {bounds[-1]} tokens", flush=True)
    result = evaluate_long_context(model, windows, bounds)
    print(result.table())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot_long_context(result, positions, f"{args.model} on {args.text.name}: perplexity by position", args.output)
    print(f"wrote the plot to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
