"""The inference goals of the chat tools: greedy decoding speed with the KV cache, evods against transformers'
LlamaForCausalLM on the same weights (what `tools/convert2hf.py --format llama` exports), in fp32 and bf16; and the
prefill of a prompt past max_position_embeddings with dynamic NTK against origin RoPE.

    OMP_NUM_THREADS=2 python bench/bench_chat_inference.py

One process; the variants take turns round by round (median of ROUNDS), so load from other work hits them alike.
Decoding: a 512-token prompt, 128 new tokens, tokens/s = 128 / (time of 129 tokens - time of 1 token), which leaves
the prompt's forward out. Prefill: one forward of 4,096 tokens with max_position_embeddings 2,048.
"""
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


def main() -> None:
    torch.manual_seed(0)
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT))
    long_prompt = torch.randint(3, CONFIG["vocab_size"], (1, PREFILL))
    evods = evods_model("origin", 4096)
    decoders = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoders[("evods", dtype)] = evods_model("origin", 4096).to(dtype)
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
          f"{CONFIG['num_hidden_layers']} layers, vocab {CONFIG['vocab_size']}, median of {ROUNDS} rounds")
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
