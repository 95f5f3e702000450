"""The inference goals of the chat tools: greedy decoding speed with the KV cache, evods against transformers'
LlamaForCausalLM on the same weights (what `tools/convert2hf.py --format llama` exports), in fp32 and bf16; and the
prefill of a prompt past max_position_embeddings with dynamic NTK against origin RoPE. With `--kv_heads 2`, decoding
of grouped-query models (2 KV heads for the 8 query heads, no biases, as InternLM2) instead, against Llama with the
same KV heads, and the KV cache's size against the multi-head model's.

    OMP_NUM_THREADS=2 python bench/bench_chat_inference.py [--kv_heads 2]

One process; the variants take turns round by round (median of ROUNDS), so load from other work hits them alike.
Decoding: a 512-token prompt, 128 new tokens, tokens/s = 128 / (time of 129 tokens - time of 1 token), which leaves
the prompt's forward out. Prefill: one forward of 4,096 tokens with max_position_embeddings 2,048.
"""
import argparse
import statistics
import time

import torch
from bench_generate import CONFIG, evods_model, generate_seconds, llama_twin

PROMPT, NEW_TOKENS, PREFILL, TRAINED_LENGTH, ROUNDS = 512, 128, 4096, 2048, 3


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def decode_tokens_per_second(model, ids: torch.Tensor) -> float:
    return NEW_TOKENS / (generate_seconds(model, ids, NEW_TOKENS + 1) - generate_seconds(model, ids, 1))


@torch.no_grad()
def cache_mib(model, ids: torch.Tensor) -> float:
    """The KV cache after generating NEW_TOKENS after `ids`, in MiB."""
    cache = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv_heads", type=int, default=None, help="decode grouped-query models with this many KV "
                        "heads (and no biases); default: multi-head with biases")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT))
    long_prompt = torch.randint(3, CONFIG["vocab_size"], (1, PREFILL))
    evods = evods_model("origin", 4096, args.kv_heads)
    decoders = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoders[("evods", dtype)] = evods_model("origin", 4096, args.kv_heads).to(dtype)
        decoders[("llama", dtype)] = llama_twin(evods).to(dtype)
    prefills = {rotary: evods_model(rotary, TRAINED_LENGTH) for rotary in ("origin", "dynamic")}
    decode = {key: [] for key in decoders}
    prefill = {key: [] for key in prefills}
    for _ in range(ROUNDS):
        for key, model in decoders.items():
            decode[key].append(decode_tokens_per_second(model, prompt))
        for key, model in prefills.items():
            prefill[key].append(prefill_seconds(model, long_prompt))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} heads, "
          f"{args.kv_heads or CONFIG['num_attention_heads']} KV heads, vocab {CONFIG['vocab_size']}, "
          f"median of {ROUNDS} rounds")
    if args.kv_heads:
        grouped, multi_head = cache_mib(evods, prompt), cache_mib(evods_model("origin", 4096), prompt)
        print(f"\nKV cache after {PROMPT} + {NEW_TOKENS} tokens, fp32: {grouped:.1f} MiB with {args.kv_heads} KV "
              f"heads, {multi_head:.1f} MiB multi-head ({multi_head / grouped:.2f}x less); Llama with "
              f"{args.kv_heads} KV heads: {cache_mib(decoders[('llama', torch.float32)], prompt):.1f} MiB")
    print(f"\n| greedy decoding, prompt {PROMPT} + {NEW_TOKENS} new | evods tokens/s | Llama tokens/s | evods / Llama |"
          "\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        ours, theirs = (statistics.median(decode[(name, dtype)]) for name in ("evods", "llama"))
        print(f"| {str(dtype).removeprefix('torch.')} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    origin, dynamic = (statistics.median(prefill[rotary]) for rotary in ("origin", "dynamic"))
    print(f"\n| prefill of {PREFILL} tokens, max_position_embeddings {TRAINED_LENGTH} | seconds |"
          f" speed vs origin |\n|---|---|---|\n| origin RoPE | {origin:.2f} | 1.00x |"
          f"\n| dynamic NTK | {dynamic:.2f} | {origin / dynamic:.2f}x |")


if __name__ == "__main__":
    main()
