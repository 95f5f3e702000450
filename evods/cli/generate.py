"""Generate from a Hugging Face folder written by tools/convert2hf.py (greedy, with the KV cache).

    python tools/generate.py --model hf/internlm --prompt "The capital of France is"
    python tools/generate.py --model hf/internlm --token_ids 4,50,0,1,2,3 --max_new_tokens 12
"""
import argparse
import sys
from pathlib import Path

from evods.cli import run_cli
from evods.inference import InferenceError
from evods.inference.display import escape_controls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an HF folder (InternLM or Llama layout)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text; needs the tokenizer in the folder (convert2hf.py --tokenizer)")
    prompt.add_argument("--token_ids", help="comma-separated token ids, for models trained without a tokenizer")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--ignore_eos", action="store_true", help="keep generating past the end-of-text token")
    args = parser.parse_args(argv)
    return run_cli(lambda: generate(args), (OSError, InferenceError))


def generate(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # importing evods registered InternLM with them

    from evods.cli.model_folder import check_not_a_training_checkpoint

    check_not_a_training_checkpoint(args.model)
    # A missing local folder would otherwise be looked up on the Hub, and fail with a message about the network.
    if not (Path(args.model) / "config.json").is_file():
        raise OSError(f"--model {args.model}: no config.json there; give a folder written by tools/convert2hf.py")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = None
    if args.prompt is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            raise OSError(f"{args.model} has no tokenizer; pass --token_ids, or convert with --tokenizer") from None
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        input_ids = torch.tensor([[int(token) for token in args.token_ids.split(",")]])
    with torch.no_grad():
        stop = {"eos_token_id": None} if args.ignore_eos else {}
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, **stop)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    print(escape_controls(tokenizer.decode(new_tokens)) if tokenizer else ",".join(map(str, new_tokens)))


if __name__ == "__main__":
    sys.exit(main())
