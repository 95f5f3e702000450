"""Starting from a sharded Hugging Face Llama folder at tensor 2 x pipeline 2: memory per rank and load time.

A Llama of ~156M parameters (hidden 1024, 8 layers, 16 query / 4 KV heads, MLP 2816, vocabulary 32,000, untied head),
saved by `save_pretrained` in fp32 with 100MB shards. Four ranks (gloo, the tests' harness) each build their part of
the model as evods' Trainer does for an HF start (evods/training/model_part.py: the model on the meta device, split
there by `apply_tensor_parallel` at tp 2, only the rank's stage and slices materialised) and read their part of the
folder with `load_rank_parts` (formats/hf_start.py: only their pipeline stage's tensors, tensor-split ones as slices
via safetensors' get_slice). Per rank:
- the bytes of the parameters it materialised, and the bytes read from the folder;
- peak RSS (getrusage's ru_maxrss) at the end, whole-process, and above the peak before the model is built (the
  imports of torch, transformers, DeepSpeed and the process groups, which are not the model's);
- load time (the `load_rank_parts` call), the ranks taking turns (the bench machine has fewer cores than ranks), and
  the part of it spent in safetensors' reads (get_slice / get_tensor), the rest being checks and the copies into
  the model's parameters;
- the load and then a first pass over every parameter it holds (a sum): where the parameters are views of the
  files' mappings (both evods and transformers keep them so), the pages are read from the page cache only then.
Against: the folder's weight bytes (the whole model) and `LlamaForCausalLM.from_pretrained` of the same folder in one
process (fp32, one thread, as each rank), timed the same two ways. Peak RSS counts the safetensors pages mapped and
touched.

    OMP_NUM_THREADS=1 python bench/bench_hf_start.py
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.distributed import run_distributed  # noqa: E402  (the same harness the tests use)

LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, tie_word_embeddings=False)
MODEL_DICT = dict(vocab_size=32000, hidden_size=1024, num_layers=8, num_attention_heads=16, num_kv_attention_heads=4,
                  mlp_ratio=2.75, multiple_of=256, no_bias=True, dtype="torch.float32", tie_word_embeddings=False)
TP, PP = 2, 2
MiB = 2**20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def load_part(folder: str) -> dict:
    import torch
    import torch.distributed as dist

    from evods.checkpoint.formats import hf_start
    from evods.model import MODEL_INITIALIZER
    from evods.parallel import TensorParallelSplit, stage_layers
    from evods.training.model_part import materialise_rank_part, parameter_bytes

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_rank, pp_rank = rank % TP, rank // TP
    groups = [dist.new_group([stage * TP + t for t in range(TP)]) for stage in range(PP)]
    before_model = peak_rss()
    with torch.device("meta"):
        model = MODEL_INITIALIZER.get_module("LLAMA2")(**MODEL_DICT)
    part = hf_start.RankPart(TensorParallelSplit.of(model.config, TP, False), tp_rank, MODEL_DICT["num_layers"],
                             stage_layers(MODEL_DICT["num_layers"], PP, pp_rank))
    materialise_rank_part(model, part, groups[pp_rank], embed_split_hidden=False, parallel_output=True,
                          sequence_parallel=False)
    read_bytes, read_seconds = 0, 0.0
    original_read = hf_start.SafetensorsFolder.read

    def counting_read(self, name, shard):
        nonlocal read_bytes, read_seconds
        start = time.perf_counter()
        tensor = original_read(self, name, shard)
        read_seconds += time.perf_counter() - start
        read_bytes += tensor.numel() * tensor.element_size()
        return tensor

    hf_start.SafetensorsFolder.read = counting_read
    for turn in range(dist.get_world_size()):  # one rank at a time, each on a core of its own
        dist.barrier()
        if turn == rank:
            start = time.perf_counter()
            hf_start.load_rank_parts(model, folder, part, folder)
            seconds = time.perf_counter() - start
            touch_all(model)
            touched = time.perf_counter() - start
    dist.barrier()
    return {"rank": rank, "tp_rank": tp_rank, "pp_rank": pp_rank, "seconds": seconds, "touched": touched,
            "read": read_bytes,
            "read_seconds": read_seconds, "peak": peak_rss(), "model_growth": peak_rss() - before_model,
            "built": parameter_bytes(model), "torch_threads": torch.get_num_threads()}


def touch_all(model) -> float:
    """Read every byte of the parameters the process holds (a tied one once)."""
    import torch

    with torch.no_grad():
        return sum(float(param.sum()) for param in model.parameters() if not param.is_meta)


def from_pretrained(folder: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    before = peak_rss()
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - start
    touch_all(model)
    return {"seconds": seconds, "touched": time.perf_counter() - start, "peak": peak_rss(),
            "load_growth": peak_rss() - before}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="from_pretrained timings (the median is kept)")
    args = parser.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-hf-start-") as root:
        folder = str(Path(root) / "llama")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(folder, max_shard_size="100MB")
        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
        whole = index["metadata"]["total_size"]
        shards = len(set(index["weight_map"].values()))
        ranks = sorted(run_distributed(load_part, TP * PP, (folder,), timeout=1200), key=lambda r: r["rank"])
        reference = sorted((run_distributed(from_pretrained, 1, (folder,))[0] for _ in range(args.rounds)),
                           key=lambda r: r["seconds"])[args.rounds // 2]
    print(f"folder: {whole / MiB:.0f} MiB of fp32 weights in {shards} shards\n")
    print("| rank (tp, pp) | parameters built | read from the folder | peak RSS at the end | of it above the RSS "
          "before the model | load time (of it in reads) | load and a first pass over the parameters |")
    print("|---|---|---|---|---|---|---|")
    for r in ranks:
        cells = [f"{r['rank']} ({r['tp_rank']}, {r['pp_rank']})"]
        cells += [f"{r[key] / MiB:.0f} MiB ({r[key] / whole:.2f}x)"
                  for key in ("built", "read", "peak", "model_growth")]
        cells.append(f"{r['seconds']:.3f} s ({r['read_seconds']:.3f} s)")
        cells.append(f"{r['touched']:.3f} s")
        print(f"| {' | '.join(cells)} |")
    print(f"| from_pretrained, 1 process | {whole / MiB:.0f} MiB (1.00x) | {whole / MiB:.0f} MiB (1.00x) | "
          f"{reference['peak'] / MiB:.0f} MiB ({reference['peak'] / whole:.2f}x) | "
          f"{reference['load_growth'] / MiB:.0f} MiB ({reference['load_growth'] / whole:.2f}x) | "
          f"{reference['seconds']:.3f} s | {reference['touched']:.3f} s |")
    for key, what in (("seconds", "load"), ("touched", "load and first pass")):
        slowest = max(r[key] for r in ranks)
        print(f"\nslowest rank's {what} / from_pretrained's: {slowest / reference[key]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
