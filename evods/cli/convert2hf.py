"""Convert an evods checkpoint or an InternEvo native one (model_tp*_pp*.pt, InternLM's or its LLaMA-family names), of
any tp/pp, to one Hugging Face folder.

    python tools/convert2hf.py --src ckpts/100 --tgt hf/internlm --tokenizer tools/V7_sft.model
    python tools/convert2hf.py --src ckpts/100 --tgt hf/llama --format llama --dtype bfloat16
    python tools/convert2hf.py --src ckpts/100 --tgt hf/internlm2 --format internlm2 --scaling_factor 2.0
    python tools/convert2hf.py --src internevo_ckpt/5000 --tgt hf/internlm --mlp_naming v2 --max_pos 4096
    python tools/convert2hf.py --src ckpts/100 --tgt hf/chatml --tokenizer tools/tokenizer_internlm2.model \
        --chat_template internlm2
    python tools/convert2hf.py --src lora_ckpts/100 --base hf/internlm-7b --tgt hf/lora --tokenizer ...
    python tools/convert2hf.py --src lora_ckpts/100 --base hf/internlm-7b --tgt hf/merged --merge

--format internlm (default): loads with `AutoModelForCausalLM.from_pretrained(tgt)` where evods is imported, or
with trust_remote_code=True elsewhere (transformers 4.36 to 5.x). --format internlm2: the same, in the layout of
InternLM's published InternLM2 folders (`InternLM2ForCausalLM`, a grouped `wqkv`), a drop-in for them. --format llama:
loads as stock `LlamaForCausalLM`.
A LoRA run's checkpoint holds its adapters only: --base names the model it trained on (its load_ckpt_info path), and
the folder holds that model with the adapters in peft's format in TGT/adapter, or with --merge the merged model.
--src_folder/--tgt_folder (InternLM's converter) and --src/--tgt are the same options.
`evods-convert2hf` once installed.
"""
import argparse
import sys

from evods.checkpoint import CheckpointError
from evods.checkpoint.formats.hf import FORMATS, ROTARY_TYPES, export_hf
from evods.checkpoint.formats.internevo_layout import MLP_NAMINGS
from evods.cli import run_cli
from evods.model.chat_templates import CHAT_TEMPLATES
from evods.storage import StorageError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", "--src_folder", required=True, help="an evods or InternEvo native checkpoint folder "
                        "(local path, local:, boto3:s3://); the format is detected")
    parser.add_argument("--tgt", "--tgt_folder", required=True, help="the HF folder to write")
    parser.add_argument("--tokenizer", help="the tokenizer to include: a SentencePiece model (tools/V7_sft.model, "
                        "tools/tokenizer_internlm2.model) or a folder with tokenizer.json")
    parser.add_argument("--chat_template", choices=tuple(CHAT_TEMPLATES),
                        help="the model's chat format (config.json, the tokenizer's chat template, the EOS ids of "
                        "generation_config.json); default: the checkpoint's (model.chat_template of the training "
                        "config, else internlm)")
    parser.add_argument("--format", choices=FORMATS, default="internlm")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: the training dtype")
    parser.add_argument("--max_shard", default="10GB", help="largest safetensors shard")
    parser.add_argument("--mlp_naming", choices=tuple(MLP_NAMINGS),
                        help="native checkpoints: v1 = InternLM (w2 up, w3 down), v2 = InternEvo since 2024-02 "
                        "(w3 up, w2 down); default: v1 for InternLM's names, read off the shapes for LLaMA's")
    parser.add_argument("--rotary_type", choices=ROTARY_TYPES,
                        help="dynamic (default, as InternLM's HF models): dynamic NTK RoPE beyond "
                        "max_position_embeddings; origin: plain RoPE. A model trained with a scaled RoPE (model."
                        "rope_scaling linear or llama3) keeps it")
    parser.add_argument("--scaling_factor", type=float, default=1.0, help="dynamic NTK's scaling factor")
    parser.add_argument("--max_pos", type=int, help="max_position_embeddings: where dynamic NTK starts to rescale; "
                        "default: the training config's (the length the model was trained for)")
    parser.add_argument("--base", help="a LoRA checkpoint's base model: the HF folder or checkpoint it trained on")
    parser.add_argument("--merge", action="store_true", help="a LoRA checkpoint: write the model with the adapters "
                        "merged in (W + B A * alpha/r), instead of the base and a peft adapter folder")
    args = parser.parse_args(argv)

    def convert():
        export_hf(args.src, args.tgt, args.tokenizer, args.format, args.dtype, args.max_shard, args.mlp_naming,
                  args.rotary_type, args.max_pos, args.scaling_factor, args.chat_template, args.base, args.merge)
        print(f"wrote {args.format} model to {args.tgt}")

    return run_cli(convert, (CheckpointError, StorageError, OSError))


if __name__ == "__main__":
    sys.exit(main())
