"""Train-step throughput of evods' InternLM vs transformers' LlamaForCausalLM(attention_bias=True) on CPU.

Same config and weights for both (hidden 512, 8 layers, 8 heads, intermediate 1536, vocab 103168; with
`--kv_heads 2` grouped-query attention, 2 KV heads as InternLM2's 4 query heads per KV head, and no biases, as
InternLM2); one 2048-token row holding 1 document or 8 documents of 256; a step is forward + loss + backward +
AdamW. Llama runs the 8-document row two ways: as one causal row (it attends across documents), and with the packed
position_ids, which transformers turns into a block-diagonal mask (documents kept apart, as evods does). Model FLOPs
= 6·N·tokens + causal attention 6·layers·hidden·Σ(doc_len²), N without the input embedding, against this machine's
measured matmul rate.

    OMP_NUM_THREADS=2 python bench/bench_model.py [--steps 3] [--dtypes fp32 bf16] [--kv_heads 2]
"""

import argparse
import platform
import statistics
import subprocess
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from evods.model import InternLMConfig, InternLMForCausalLM

SEQ_LEN = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG = dict(
    vocab_size=103168, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    max_position_embeddings=SEQ_LEN,
)


def make_models(kv_heads: int | None = None) -> tuple[InternLMForCausalLM, LlamaForCausalLM]:
    """Multi-head with biases (InternLM v1), or with `kv_heads` grouped-query attention without biases (InternLM2)."""
    torch.manual_seed(0)
    kv_heads = kv_heads or CONFIG["num_attention_heads"]
    bias = kv_heads == CONFIG["num_attention_heads"]
    internlm = InternLMForCausalLM(InternLMConfig(**CONFIG, num_key_value_heads=kv_heads, bias=bias,
                                                  rotary={"base": 10000, "type": "origin"}))
    llama = LlamaForCausalLM(LlamaConfig(**CONFIG, num_key_value_heads=kv_heads, attention_bias=bias,
                                         tie_word_embeddings=False))
    llama.load_state_dict(internlm.state_dict())
    return internlm, llama


def interleaved_step_seconds(runs, input_ids, steps: int) -> dict[str, float]:
    """Median wall time of a training step per run, after one warmup step each.

    The runs take turns step by step, so load from other work on the machine hits them alike and the ratios hold.
    """
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model, _ in runs}
    times = {name: [] for name, _, _ in runs}
    for _ in range(steps + 1):
        for name, model, position_ids in runs:
            start = time.perf_counter()
            loss = model(input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds[1:]) for name, seconds in times.items()}


def matmul_flops_per_s(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def model_flops_per_step(model: InternLMForCausalLM, doc_lengths: list[int]) -> float:
    c = model.config
    n_params = model.num_parameters() - c.vocab_size * c.hidden_size  # the input embedding is a lookup
    attention = 6 * c.num_hidden_layers * c.hidden_size * sum(n * n for n in doc_lengths)
    return 6 * n_params * sum(doc_lengths) + attention


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kv_heads", type=int, default=None, help="grouped-query attention with this many KV heads "
                        "(and no biases); default: multi-head with biases")
    args = parser.parse_args()

    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; KV heads {args.kv_heads or CONFIG['num_attention_heads']}")
    internlm, llama = make_models(args.kv_heads)
    layouts = {"1 doc": [SEQ_LEN], "8 docs": [SEQ_LEN // 8] * 8}
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        internlm.to(dtype), llama.to(dtype)
        peak = matmul_flops_per_s(dtype)
        print(f"{dtype_name} matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
        for layout, doc_lengths in layouts.items():
            input_ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ_LEN))
            packed_positions = torch.cat([torch.arange(n) for n in doc_lengths])[None]
            runs = [("evods", internlm, packed_positions), ("llama, one causal row", llama, None)]
            if len(doc_lengths) > 1:
                runs.append(("llama, packed position_ids (mask)", llama, packed_positions))
            flops = model_flops_per_step(internlm, doc_lengths)
            timings = interleaved_step_seconds(runs, input_ids, args.steps)
            for name, seconds in timings.items():
                rows.append((dtype_name, layout, name, seconds, SEQ_LEN / seconds,
                             timings["llama, one causal row"] / seconds, flops / seconds / 1e9,
                             100 * flops / seconds / peak))
                print(f"  {dtype_name} {layout} {name}: {seconds:.2f} s/step", flush=True)

    print("\n| dtype | row | model | s/step | tokens/s | speed vs llama causal row | model GFLOP/s "
          "| % of matmul rate |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name, layout, name, seconds, tps, ratio, gflops, mfu in rows:
        print(f"| {dtype_name} | {layout} | {name} | {seconds:.2f} | {tps:.0f} | {ratio:.2f}x | {gflops:.1f} "
              f"| {mfu:.0f}% |")


if __name__ == "__main__":
    main()
