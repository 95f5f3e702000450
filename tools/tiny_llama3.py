"""Write a tiny random Llama-3-shaped Hugging Face folder to start configs/demo_cpu_llama3.py from: a byte-level BPE
`tokenizer.json` in Llama-3's form trained on the shipped samples (Meta's own tokenizer is not redistributable), and a
`LlamaForCausalLM` of the Llama-3.2-1B layout at toy size (grouped KV heads, llama3 RoPE scaling, the output head tied
to the embedding) saved by `save_pretrained` in several safetensors shards, as published folders are.

    python tools/tiny_llama3.py --out demo_out/tiny_llama3
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.chat_models import llama3_tokenizer_folder  # noqa: E402

# The shapes of configs/demo_cpu_llama3.py's model dict; the vocabulary rounds the tokenizer's 2005 tokens up to a
# multiple of 64, as published models pad theirs, so that it splits over tensor ranks.
VOCAB_SIZE = 2048
LLAMA3_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=128)
SHAPE = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
             tie_word_embeddings=True, attention_bias=False)


def write_tiny_llama3(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    llama3_tokenizer_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE, rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="1MB")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        print(f"--out {args.out} is not empty; give a new folder", file=sys.stderr)
        return 2
    write_tiny_llama3(Path(args.out), args.seed)
    print(f"wrote {args.out}: LlamaForCausalLM (tied head, llama3 RoPE, 8 query / 2 KV heads) and its tokenizer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
