"""Memory and speed of the training loss over InternLM's 103,168-token vocabulary: evods' head + cross entropy in token
chunks (`loss.kernel="chunked"`, the default off CUDA) against the whole [tokens, vocab] logits (evods with
`loss.kernel="full"`, and transformers' LlamaForCausalLM with its own loss).

Model: hidden 512, 8 layers, 8 heads, intermediate 1536, vocab 103168, fp32, one packed row (one document) per
micro-batch. A step is forward + loss + backward + AdamW. Every measurement runs in a process of its own, limited with
`resource.setrlimit(RLIMIT_DATA, cap)`, so a run that needs more than the cap fails instead of taking the machine.

- memory: peak of the step's live tensors (torch's MemTracker, torch.distributed._tools) and the process's peak RSS
  (VmHWM). A run over the cap reports a lower bound: what was live when an allocation failed, plus that allocation.
- fit: the largest micro-batch (a multiple of `--step_tokens`, 512) whose step fits in the cap, before (unchunked)
  and after.
- time: median seconds per step; the two evods kernels share one model and take turns step by step, so load from
  other work on the machine hits them alike.

    OMP_NUM_THREADS=2 python bench/bench_loss.py memory [--tokens 1024 2048 8192] [--cap_gib 8] [--recompute both]
    OMP_NUM_THREADS=2 python bench/bench_loss.py fit [--cap_gib 6] [--step_tokens 512]
    OMP_NUM_THREADS=2 python bench/bench_loss.py time [--tokens 2048] [--steps 3]
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

GIB = 2**30
MODEL = dict(vocab_size=103168, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)
VARIANTS = {  # name -> loss kernel (None: transformers' Llama computes its own loss from its logits)
    "evods chunked": "chunked",
    "evods unchunked": "full",
    "transformers Llama": None,
}


# ------------------------------------------------------------------------------------------------ child process

def make_row(tokens: int):
    """One packed row of random tokens: input_ids and position_ids [1, tokens], and the labels (next tokens)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=generator)
    return input_ids, torch.arange(tokens)[None], input_ids.roll(-1, dims=1)


def evods_model(tokens: int, recompute: bool):
    import torch

    from evods.model import InternLMConfig, InternLMForCausalLM, set_activation_checkpointing

    torch.manual_seed(0)
    model = InternLMForCausalLM(InternLMConfig(**MODEL, max_position_embeddings=tokens,
                                               rotary={"base": 10000, "type": "origin"}))
    set_activation_checkpointing(model, recompute)
    return model.train()


def build_step(variant: str, tokens: int, recompute: bool):
    """A function running one training step of `variant` on a `tokens`-token row, and the model and optimizer."""
    import torch

    input_ids, position_ids, labels = make_row(tokens)
    if VARIANTS[variant] is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL, max_position_embeddings=tokens, attention_bias=True,
                                             tie_word_embeddings=False)).train()
        if recompute:
            model.gradient_checkpointing_enable()

        def loss_of_step():  # transformers shifts the labels itself
            return model(input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).loss
    else:
        from evods.training.loss import PackedLoss, TokenMetrics

        model = evods_model(tokens, recompute)
        loss_fn = PackedLoss(model.lm_head, metrics=TokenMetrics(1), kernel=VARIANTS[variant])

        def loss_of_step():
            hidden = model(input_ids, position_ids=position_ids, skip_lm_head=True).last_hidden_state
            return loss_fn(hidden, (labels, input_ids * 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss_of_step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, optimizer


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def out_of_memory_request(error: BaseException) -> int | None:
    """The bytes a failed CPU allocation asked for, or None when `error` is not an allocation failure."""
    match = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(error))
    return int(match.group(1)) if match else None


def child_memory(variant: str, tokens: int, recompute: bool) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    step, model, optimizer = build_step(variant, tokens, recompute)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    try:
        with tracker:
            step()
    except RuntimeError as error:
        requested = out_of_memory_request(error)
        if requested is None:
            raise
        current = tracker.get_tracker_snapshot("current")
        live = sum(device["Total"] for device in current.values())
        return {"fits": False, "lower_bound": live + requested, "peak_rss": peak_rss_bytes()}
    peak = tracker.get_tracker_snapshot("peak")
    return {"fits": True, "peak_tensors": sum(device["Total"] for device in peak.values()),
            "peak_rss": peak_rss_bytes()}


def child_fits(variant: str, tokens: int, recompute: bool) -> dict:
    step, _, _ = build_step(variant, tokens, recompute)
    try:
        step()
    except RuntimeError as error:
        if out_of_memory_request(error) is None:
            raise
        return {"fits": False}
    return {"fits": True, "peak_rss": peak_rss_bytes()}


def child_time(tokens: int, steps: int) -> dict:
    """Both evods kernels on one model, taking turns step by step (one warm-up step each)."""
    import torch

    from evods.training.loss import PackedLoss, TokenMetrics

    model = evods_model(tokens, recompute=False)
    input_ids, position_ids, labels = make_row(tokens)
    losses = {kernel: PackedLoss(model.lm_head, metrics=TokenMetrics(1), kernel=kernel)
              for kernel in ("chunked", "full")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = {kernel: [] for kernel in losses}
    for _ in range(steps + 1):
        for kernel, loss_fn in losses.items():
            start = time.perf_counter()
            hidden = model(input_ids, position_ids=position_ids, skip_lm_head=True).last_hidden_state
            loss_fn(hidden, (labels, input_ids * 0)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[kernel].append(time.perf_counter() - start)
    return {kernel: statistics.median(seconds[1:]) for kernel, seconds in times.items()}


# ----------------------------------------------------------------------------------------------- parent process

def run_child(cap_gib: float, job: dict) -> dict:
    """Run `job` in a fresh process limited to `cap_gib` GiB of data memory; its result, or {"fits": False} when the
    process died (some allocation failures abort instead of raising)."""
    command = [sys.executable, __file__, "--child", json.dumps({**job, "cap_gib": cap_gib})]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        if job["kind"] == "time":
            raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
        return {"fits": False, "died": done.returncode}
    return json.loads(lines[-1])


def child_main(job: dict) -> None:
    cap = int(job.pop("cap_gib") * GIB)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    kind = job.pop("kind")
    result = {"memory": child_memory, "fits": child_fits, "time": child_time}[kind](**job)
    print(json.dumps(result), flush=True)


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def memory_table(tokens_list: list[int], cap_gib: float, recompute_choices: tuple[bool, ...]) -> None:
    print(f"Peak memory of one step (GiB), each run a fresh process capped at {cap_gib:g} GiB\n")
    print("| tokens | recompute | variant | peak tensors (MemTracker) | peak RSS | chunked vs this |")
    print("|---|---|---|---|---|---|")
    for tokens in tokens_list:
        for recompute in recompute_choices:
            results = {name: run_child(cap_gib, dict(kind="memory", variant=name, tokens=tokens,
                                                     recompute=recompute)) for name in VARIANTS}
            chunked = results["evods chunked"]
            for name, result in results.items():
                if result["fits"]:
                    tensors, rss = gib(result["peak_tensors"]), gib(result["peak_rss"])
                    ratio = f"{chunked['peak_tensors'] / result['peak_tensors']:.2f}x" if chunked["fits"] else ""
                elif "lower_bound" in result:
                    tensors, rss = f"> {gib(result['lower_bound'])} (out of memory)", f"> {cap_gib:g} cap"
                    ratio = f"< {chunked['peak_tensors'] / result['lower_bound']:.2f}x" if chunked["fits"] else ""
                else:
                    tensors, rss, ratio = "died over the cap", f"> {cap_gib:g} cap", ""
                print(f"| {tokens} | {'yes' if recompute else 'no'} | {name} | {tensors} | {rss} | {ratio} |",
                      flush=True)


def largest_fit(kernel_variant: str, cap_gib: float, step_tokens: int = 512, limit: int = 65536) -> int:
    """The largest multiple of `step_tokens` whose step fits in the cap: doubling, then bisection."""
    fits = lambda tokens: run_child(cap_gib, dict(kind="fits", variant=kernel_variant, tokens=tokens,  # noqa: E731
                                                  recompute=False))["fits"]
    low, high = 0, step_tokens
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > step_tokens:
        middle = (low + high) // 2 // step_tokens * step_tokens
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fit_table(cap_gib: float, step_tokens: int) -> None:
    print(f"Largest micro-batch whose step fits in a process capped at {cap_gib:g} GiB (multiples of {step_tokens} "
          f"tokens)\n")
    print("| variant | tokens |")
    print("|---|---|")
    for name in ("evods unchunked", "evods chunked"):
        print(f"| {name} | {largest_fit(name, cap_gib, step_tokens)} |", flush=True)


def time_table(tokens_list: list[int], steps: int, cap_gib: float) -> None:
    print(f"Seconds per step, median of {steps} after a warm-up, the kernels taking turns on one model\n")
    print("| tokens | unchunked s/step | chunked s/step | chunked / unchunked |")
    print("|---|---|---|---|")
    for tokens in tokens_list:
        result = run_child(cap_gib, dict(kind="time", tokens=tokens, steps=steps))
        print(f"| {tokens} | {result['full']:.2f} | {result['chunked']:.2f} | "
              f"{result['chunked'] / result['full']:.3f} |", flush=True)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=("memory", "fit", "time"))
    parser.add_argument("--tokens", type=int, nargs="+", help="micro-batch sizes (memory: 1024 2048 8192; time: 2048)")
    parser.add_argument("--cap_gib", type=float, help="data-memory cap per process (fit: 6; others: 8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recompute", choices=("no", "yes", "both"), default="both",
                        help="memory: with activation recompute, without, or both")
    parser.add_argument("--step_tokens", type=int, default=512, help="fit: the micro-batch sizes tried are multiples")
    args = parser.parse_args()
    if args.measure == "memory":
        recompute = {"no": (False,), "yes": (True,), "both": (False, True)}[args.recompute]
        memory_table(args.tokens or [1024, 2048, 8192], args.cap_gib or 8, recompute)
    elif args.measure == "fit":
        fit_table(args.cap_gib or 6, args.step_tokens)
    else:
        time_table(args.tokens or [2048], args.steps, args.cap_gib or 8)


if __name__ == "__main__":
    main()
