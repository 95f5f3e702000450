"""Convert an evods checkpoint to a Hugging Face folder.

    python tools/convert2hf.py --src ckpts/100 --tgt hf/internlm --tokenizer V7_sft.model
    python tools/convert2hf.py --src ckpts/100 --tgt hf/llama --format llama --dtype bfloat16

--format internlm (default): loads with `AutoModelForCausalLM.from_pretrained(tgt)` where evods is imported, or
with trust_remote_code=True elsewhere. --format llama: loads as stock `LlamaForCausalLM`.
"""
import argparse
import sys

from evods.checkpoint import CheckpointError
from evods.checkpoint.hf_export import FORMATS, export_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="an evods checkpoint folder (local path, local:, boto3:s3://)")
    parser.add_argument("--tgt", required=True, help="the HF folder to write")
    parser.add_argument("--tokenizer", help="SentencePiece model to include (e.g. V7_sft.model)")
    parser.add_argument("--format", choices=FORMATS, default="internlm")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: the training dtype")
    parser.add_argument("--max_shard", default="10GB", help="largest safetensors shard")
    args = parser.parse_args(argv)
    try:
        export_hf(args.src, args.tgt, args.tokenizer, args.format, args.dtype, args.max_shard)
    except CheckpointError as exc:
        print(f"convert2hf: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} model to {args.tgt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
