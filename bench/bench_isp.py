"""The longest packed row that trains under a per-rank memory cap with isp (InternEvo's Ulysses sequence parallelism,
evods.parallel.ulysses), and isp 2's step time against one rank on the same row.

Model hidden 512, 8 layers, 8 heads, mlp_ratio 3, the V7 vocabulary (103,168), fp32, DeepSpeed ZeRO-1 AdamW through
evods' TrainEngine (the Trainer's engine path: forward, backward, optimizer step), rows of documents of 512 tokens.
For each rank count (1; 2 with isp 2; 4 with isp 4), one launch:
- a warm-up step at 64 tokens (the optimizer state and DeepSpeed's buffers exist before anything is measured);
- with --time_row, `--timed_steps` steps on that row without the profiler (fastest reported), and the seconds spent
  in the isp all-to-alls (evods.parallel.comm's all-to-all, wrapped in a timer here: it carries both directions of
  every exchange, forward and backward);
- the search: each tried length is one real step under torch's memory profiler; its peak is the bytes held before
  the step plus the highest sum of allocations minus frees within it (testkit/allocations.py), the largest over the
  ranks; it fits when that is under the cap. Doubling from 64 tokens (`--start_tokens`), then bisection on
  multiples of 64 (`--granularity`).

    OMP_NUM_THREADS=1 flock /tmp/evods-heavy.lock python bench/bench_isp.py --cap_mib 2600 [--ranks 1 2 4]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.allocations import allocator_peak  # noqa: E402
from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)

MODEL = dict(hidden_size=512, num_layers=8, num_attention_heads=8, mlp_ratio=3, vocab_size=103168)
DOCUMENT, STEP = 512, 64
MiB = 2**20


def make_batch(tokens: int) -> dict:
    import torch

    ids = torch.randint(3, MODEL["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    positions = (torch.arange(tokens) % DOCUMENT)[None]
    return {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, dims=1), "type_ids": ids * 0}


def build_engine():
    """evods' TrainEngine as the Trainer builds it for `tensor=dict(size=world, mode="isp")`."""
    import torch
    import torch.distributed as dist

    from evods.model.registry import MODEL_INITIALIZER
    from evods.parallel import apply_ulysses, build_parallel_grid, parallel_layout
    from evods.training.engine import TrainEngine
    from evods.training.loss import PackedLoss

    world = dist.get_world_size()
    layout = parallel_layout(dist.get_rank(), world, pp=1, tp=1, sp=world)
    grid = build_parallel_grid(layout)
    torch.manual_seed(0)
    model = MODEL_INITIALIZER.get_module("INTERNLM")(**MODEL, dtype=torch.float32)
    isp_group = grid.get_ulysses_group() if world > 1 else None
    if isp_group is not None:
        apply_ulysses(model, isp_group)
    # DeepSpeed's ZeRO-1 stages gradients in a reduce_bucket_size buffer allocated every step (2 GiB at evods'
    # default of InternEvo's 512 Mi elements); a bucket of the model's size keeps that constant out of the peak.
    bucket = sum(p.numel() for p in model.parameters())
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                 "zero_optimization": {"stage": 1, "reduce_bucket_size": bucket}, "gradient_clipping": 1.0,
                 "steps_per_print": 10**9}
    loss_fn = PackedLoss(model.lm_head, isp_group=isp_group)  # the default chunked loss, as the Trainer's
    return TrainEngine(model, lambda params: torch.optim.AdamW(params, lr=1e-4), ds_config, layout, loss_fn, grid)


def all_to_all_timer():
    """Wrap evods.parallel.comm's all-to-all (every isp exchange, forward and backward, goes through it) so that its
    seconds add up in the returned list's one element."""
    from evods.parallel import comm

    spent = [0.0]
    exchange = comm._all_to_all_first_dim

    def timed(tensor, group):
        start = time.perf_counter()
        out = exchange(tensor, group)
        spent[0] += time.perf_counter() - start
        return out

    comm._all_to_all_first_dim = timed
    return spent


def search(cap_mib: int, time_row: int, timed_steps: int, start_tokens: int = STEP, granularity: int = STEP,
           max_tokens: int = 2**20) -> dict:
    """One launch's rank: warm-up, the timed steps on `time_row` (if any), then the search (cap_mib 0: none)."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from evods.training.distributed import init_distributed

    init_distributed("torch")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as start:
        engine = build_engine()
        engine.train_step(make_batch(STEP))
    held = allocator_peak(start)[1]  # the model, its gradients, DeepSpeed's buffers and this rank's optimizer state
    result = {"held": held, "tried": {}}
    if time_row:
        spent = all_to_all_timer()
        times, comm = [], []
        for _ in range(timed_steps):
            spent[0] = 0.0
            begin = time.perf_counter()
            engine.train_step(make_batch(time_row))
            times.append(time.perf_counter() - begin)
            comm.append(spent[0])
        fastest = min(range(timed_steps), key=times.__getitem__)
        result["time"] = (times[fastest], comm[fastest])

    def peak_of(tokens: int) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as step:
            engine.train_step(make_batch(tokens))
        peak = torch.tensor(held + allocator_peak(step)[0])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result["tried"][tokens] = int(peak)
        if dist.get_rank() == 0:  # as it goes, so that a launch cut short by its timeout still shows its steps
            print(f"{dist.get_world_size()} rank(s): {tokens} tokens, peak {int(peak) / MiB:.0f} MiB", flush=True)
        return int(peak)

    if not cap_mib:
        return result
    cap = cap_mib * MiB
    fits, fails = 0, start_tokens
    while peak_of(fails) <= cap:
        fits, fails = fails, min(fails * 2, max_tokens)
        if fits == max_tokens:  # a lower bound: the search tries nothing longer
            result["longest"], result["at_least"] = fits, True
            return result
    while fails - fits > granularity:
        middle = (fits + fails) // 2 // granularity * granularity
        if peak_of(middle) <= cap:
            fits = middle
        else:
            fails = middle
    result["longest"] = fits
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap_mib", type=int, required=True,
                        help="the per-rank cap on torch's allocations (0: time only)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--time_row", type=int, default=1024, help="the row timed at 1 rank and at isp 2 (0: none)")
    parser.add_argument("--timed_steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    parser.add_argument("--start_tokens", type=int, default=STEP,
                        help="the first length the doubling tries (a multiple of 64; larger skips the short steps)")
    parser.add_argument("--max_tokens", type=int, default=2**20,
                        help="the longest row tried (the host's memory holds every rank's step, and torch's memory "
                             "profiler's records of it); fitting there, the result is a lower bound")
    parser.add_argument("--granularity", type=int, default=STEP,
                        help="the bisection's step in tokens (a multiple of 64; the longest row is exact to it)")
    args = parser.parse_args()
    results = {}
    for ranks in args.ranks:
        begin = time.monotonic()
        time_row = args.time_row if ranks <= 2 else 0
        results[ranks] = run_distributed(search, world=ranks, args=(args.cap_mib, time_row, args.timed_steps,
                                                                    args.start_tokens, args.granularity,
                                                                    args.max_tokens),
                                         timeout=args.timeout)
        tried = ", ".join(f"{t}: {p / MiB:.0f}" for t, p in results[ranks][0]["tried"].items())
        print(f"{ranks} rank(s), {time.monotonic() - begin:.0f} s; tried (tokens: peak MiB) {tried}", flush=True)
        if time_row:  # per rank: (seconds of the fastest timed step, its seconds in the all-to-alls)
            print(f"{ranks} rank(s), row {time_row}: " + ", ".join(f"{s:.2f} s ({c:.2f} s all-to-all)"
                                                                   for s, c in (r["time"] for r in results[ranks])))
    print(f"\nmodel {MODEL}, fp32, ZeRO-1, documents of {DOCUMENT} tokens; cap {args.cap_mib} MiB per rank\n")
    print("| ranks | isp | held before a step, MiB per rank (max) | longest row, tokens | its peak, MiB | vs 1 rank |")
    print("|---|---|---|---|---|---|")
    base = results.get(1, [{}])[0].get("longest")
    for ranks, per_rank in results.items() if args.cap_mib else ():
        held = max(r["held"] for r in per_rank) / MiB
        longest = per_rank[0]["longest"]
        at_least = "≥ " if per_rank[0].get("at_least") else ""
        ratio = f"{at_least}{longest / base:.2f}x" if base else "-"
        peak = f"{per_rank[0]['tried'][longest] / MiB:.0f}" if longest else "-"
        print(f"| {ranks} | {ranks if ranks > 1 else '-'} | {held:.0f} | {at_least}{longest or 'none'} | {peak} | "
              f"{ratio} |")
    if args.time_row and 1 in results and 2 in results:
        print(f"\n| ranks | row | s/step (fastest of {args.timed_steps}, slowest rank) | tokens per rank | "
              "s per 1k tokens per rank | vs 1 rank | all-to-all share |")
        print("|---|---|---|---|---|---|---|")
        per_token = {}
        for ranks in (1, 2):
            seconds, comm = max((r["time"] for r in results[ranks]), key=lambda t: t[0])
            per_token[ranks] = seconds / (args.time_row / ranks)
            print(f"| {ranks} | {args.time_row} | {seconds:.2f} | {args.time_row // ranks} | "
                  f"{1000 * per_token[ranks]:.2f} | {per_token[ranks] / per_token[1]:.2f}x | {comm / seconds:.1%} |")


if __name__ == "__main__":
    main()
