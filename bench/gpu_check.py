"""The parts of bench/gpu_check.sh that run in one Python process, each printing Markdown table rows.

    python bench/gpu_check.py attention [--smoke]      packed attention backends vs the masked reference
    python bench/gpu_check.py model [--smoke]          train step and greedy decoding, evods vs transformers' Llama
    python bench/gpu_check.py runs DIR...              the train_ds.py runs' metrics (tflops, tgs, MFU, loss scale)

--smoke shrinks every size so that the script can be tried on a CPU machine before device time is spent.
"""
import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evods.checkpoint.formats.hf import llama_config  # noqa: E402
from evods.model import InternLMConfig, InternLMForCausalLM  # noqa: E402
from evods.model import modeling_internlm as modeling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def document_lengths(total: int, count: int, seed: int = 0) -> list[int]:
    """`count` documents of uneven lengths that fill `total` tokens."""
    generator = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(total - 1, generator=generator)[:count - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def packed_position_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def attention(smoke: bool) -> None:
    seq_len, heads, head_dim = (256, 4, 16) if smoke else (4096, 16, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    documents = modeling.PackedDocuments.from_position_ids(
        packed_position_ids(document_lengths(seq_len, 8)).to(DEVICE))
    scale = head_dim**-0.5
    auto = modeling.packed_attention_backend("auto", torch.device(DEVICE)).__name__.removeprefix("packed_attention_")
    print(f"\n### Packed attention: 8 documents in one {seq_len}-token row, {heads} query heads of {head_dim}, "
          f"{dtype}; auto = {auto}\n")
    print("| backend | KV heads | max abs diff vs fp32 masked reference | forward+backward ms |")
    print("|---|---|---|---|")
    for kv_heads in (heads, heads // 4):  # multi-head, and grouped-query attention (InternLM2's 4 query heads per KV)
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        q = torch.randn(1, seq_len, heads, head_dim, device=DEVICE, dtype=dtype, generator=generator)
        k, v = (torch.randn(1, seq_len, kv_heads, head_dim, device=DEVICE, dtype=dtype, generator=generator)
                for _ in range(2))
        attention_rows(q, k, v, documents, scale, smoke)


def attention_rows(q, k, v, documents, scale: float, smoke: bool) -> None:
    reference = modeling.packed_attention_mask(q.float(), k.float(), v.float(), documents, scale)
    for name in ["mask", "loop", "flex", "varlen", "flash"]:
        backward = DEVICE == "cuda"  # flex has no CPU backward; the CPU smoke run times the forward alone
        inputs = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]

        def step(name=name, inputs=inputs, backward=backward):
            out = modeling.packed_attention_backend(name, q.device)(*inputs, documents, scale)
            if backward:
                out.float().square().mean().backward()
            return out

        try:
            with torch.set_grad_enabled(backward):
                out = step()
                diff = (out.float() - reference).abs().max().item()
                ms = median_seconds(step, repeats=3 if smoke else 10) * 1e3
            print(f"| {name} | {k.shape[2]} | {diff:.2e} | {ms:.2f} |")
        except Exception as error:  # a backend this machine lacks is a row, not the end of the check
            print(f"| {name} | {k.shape[2]} | unavailable: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:100]} | |")


def model_config(smoke: bool) -> dict:
    if smoke:
        return dict(vocab_size=103168, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256)
    return dict(vocab_size=103168, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                num_attention_heads=16, max_position_embeddings=4096)


def build_models(smoke: bool):
    from transformers import LlamaForCausalLM

    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    config = InternLMConfig(**model_config(smoke), rotary={"base": 10000, "type": "origin"})
    with torch.device(DEVICE):
        internlm = InternLMForCausalLM(config).to(dtype)
        llama = LlamaForCausalLM(llama_config(config)).to(dtype)
    llama.config._attn_implementation = "sdpa"
    llama.load_state_dict(internlm.state_dict())
    return internlm, llama


def train_steps(internlm, llama, smoke: bool) -> None:
    seq_len = internlm.config.max_position_embeddings
    input_ids = torch.randint(0, internlm.config.vocab_size, (1, seq_len), device=DEVICE)
    one_document = torch.arange(seq_len, device=DEVICE)[None]
    eight_documents = packed_position_ids(document_lengths(seq_len, 8)).to(DEVICE)
    runs = {
        "evods, 1 document": (internlm, one_document),
        "Llama sdpa, 1 document": (llama, one_document),
        "evods, 8 packed documents": (internlm, eight_documents),
        "Llama sdpa, 8 documents as one causal row": (llama, one_document),
        "Llama sdpa, 8 documents by packed position_ids": (llama, eight_documents),
    }
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (internlm, llama)}
    seconds = {name: [] for name in runs}
    for repeat in range(3 if smoke else 8):
        for name, (model, position_ids) in runs.items():  # interleaved, so drifting clocks hit every run alike
            synchronize()
            start = time.perf_counter()
            model(input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).loss.backward()
            optimizers[id(model)].step()
            optimizers[id(model)].zero_grad(set_to_none=True)
            synchronize()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    step = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n### Train step (forward, loss, backward, AdamW), one {seq_len}-token row, same weights\n")
    print("| run | ms | evods speed-up |")
    print("|---|---|---|")
    pairs = {"Llama sdpa, 1 document": "evods, 1 document",
             "Llama sdpa, 8 documents as one causal row": "evods, 8 packed documents",
             "Llama sdpa, 8 documents by packed position_ids": "evods, 8 packed documents"}
    for name, value in step.items():
        ratio = f"{value / step[pairs[name]]:.2f}x" if name in pairs else ""
        print(f"| {name} | {value * 1e3:.1f} | {ratio} |")


@torch.no_grad()
def decoding(internlm, llama, smoke: bool) -> None:
    prompt_len, new_tokens = (32, 16) if smoke else (512, 128)
    prompt = torch.randint(3, internlm.config.vocab_size, (1, prompt_len), device=DEVICE)
    rates = {}
    for name, model in (("evods", internlm), ("Llama sdpa", llama)):
        model.eval()

        def generate(model=model):
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)

        rates[name] = new_tokens / median_seconds(generate, repeats=3, warmup=1)
    print(f"\n### Greedy decoding with the KV cache, prompt {prompt_len} + {new_tokens} new tokens, batch 1\n")
    print("| model | tokens/s | vs Llama |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['Llama sdpa']:.2f}x |")


def model(smoke: bool) -> None:
    internlm, llama = build_models(smoke)
    train_steps(internlm, llama, smoke)
    decoding(internlm, llama, smoke)


def runs(run_dirs: list[str]) -> None:
    """One row per train_ds.py run: steady-state tflops, tgs and MFU (median after 3 warm-up steps), loss scale and
    skipped steps, the loss at step 10, and the peak memory from the run's log."""
    print("\n### train_ds.py through the deepspeed launcher, 1 GPU\n")
    print("| run | steps | tflops | tgs | MFU | loss step 0 → 10 → last | loss scale (first → last) | skipped | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    losses_at_10 = {}
    for run_dir in map(Path, run_dirs):
        name = run_dir.name
        metrics_files = sorted(run_dir.glob("**/metrics.jsonl"))
        if not metrics_files:
            print(f"| {name} | FAILED: no metrics.jsonl (see {name}.log) | | | | | | | |")
            continue
        rows = [json.loads(line) for line in metrics_files[0].read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "tflops" in row]
        steady = rows[3:] or rows

        def middle(key, steady=steady):
            values = [row[key] for row in steady if row.get(key) is not None]
            return statistics.median(values) if values else float("nan")

        losses = {row["step"]: row["loss"] for row in rows}
        losses_at_10[name] = losses.get(10, rows[-1]["loss"])
        log = (run_dir.parent / f"{name}.log")
        peak = re.findall(r"peak GPU memory: ([\d.]+) GiB allocated", log.read_text()) if log.exists() else []
        mfu = middle("mfu")
        print(f"| {name} | {len(rows)} | {middle('tflops'):.3g} | {middle('tgs'):.4g} | "
              f"{'n/a' if math.isnan(mfu) else f'{mfu:.1%}'} | {rows[0]['loss']:.3f} → {losses_at_10[name]:.3f} → "
              f"{rows[-1]['loss']:.3f} | {rows[0]['loss_scale']:g} → {rows[-1]['loss_scale']:g} | "
              f"{rows[-1]['inf_nan_skip_batches']} | {peak[-1] if peak else 'n/a'} |")
    if "bf16" in losses_at_10 and "fp16" in losses_at_10:
        gap = abs(losses_at_10["fp16"] - losses_at_10["bf16"]) / losses_at_10["bf16"]
        print(f"\nfp16 vs bf16 loss at step 10: {gap:.2%} apart (goal ≤ 2%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("attention", "model", "runs"))
    parser.add_argument("run_dirs", nargs="*")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.part == "runs":
        runs(args.run_dirs)
    else:
        {"attention": attention, "model": model}[args.part](args.smoke)


if __name__ == "__main__":
    main()
