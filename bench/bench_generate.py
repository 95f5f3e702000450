"""Cached greedy decoding: time per new token of evods' model with origin RoPE, with dynamic NTK below
max_position_embeddings (where cached keys are not rotated again) and past it (where every step rotates all cached
keys with the current length's base), against transformers' Llama with the same weights.

    OMP_NUM_THREADS=2 python bench/bench_generate.py

One process, fp32, hidden 512, 8 layers, 8 heads, a 1024-token prompt, 64 new tokens; the models take turns round by
round (median of 3 rounds), so load from other work hits them alike. Time per token = (generate 65 tokens - generate 1
token) / 64, which leaves the prompt's forward out.
"""
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evods.model import InternLMConfig, InternLMForCausalLM

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)
PROMPT, NEW_TOKENS, ROUNDS = 1024, 64, 3


def evods_model(rotary_type: str, max_position_embeddings: int, kv_heads: int | None = None) -> InternLMForCausalLM:
    """Multi-head with biases (InternLM v1), or with `kv_heads` grouped-query attention without biases (InternLM2)."""
    torch.manual_seed(0)
    kv_heads = kv_heads or CONFIG["num_attention_heads"]
    config = InternLMConfig(**CONFIG, rotary={"base": 10000, "type": rotary_type},
                            max_position_embeddings=max_position_embeddings, num_key_value_heads=kv_heads,
                            bias=kv_heads == CONFIG["num_attention_heads"])
    return InternLMForCausalLM(config).eval()


def llama_twin(model: InternLMForCausalLM) -> LlamaForCausalLM:
    config = LlamaConfig(**CONFIG, num_key_value_heads=model.config.num_key_value_heads,
                         attention_bias=model.config.bias,
                         max_position_embeddings=model.config.max_position_embeddings, rms_norm_eps=1e-6)
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(model.state_dict())
    return llama


@torch.no_grad()
def generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT))
    origin = evods_model("origin", 4096)
    models = {
        "evods, origin RoPE": origin,
        "evods, dynamic NTK within max_position_embeddings (4096)": evods_model("dynamic", 4096),
        "evods, dynamic NTK past max_position_embeddings (512)": evods_model("dynamic", 512),
        "transformers Llama (attention_bias), same weights": llama_twin(origin),
    }
    per_token = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            full, prompt_only = generate_seconds(model, ids, NEW_TOKENS + 1), generate_seconds(model, ids, 1)
            per_token[name].append((full - prompt_only) / NEW_TOKENS)
    reference = statistics.median(per_token["evods, origin RoPE"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {PROMPT}, {NEW_TOKENS} new tokens")
    print("| model | ms/token | vs evods origin |\n|---|---|---|")
    for name, times in per_token.items():
        median = statistics.median(times)
        print(f"| {name} | {median * 1000:.1f} | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
