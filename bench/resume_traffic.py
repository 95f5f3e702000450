"""S3 traffic of a resume: bytes and GET requests per rank and node, measured at the S3 server on a simulated
two-node cluster, checked against the formula in BENCHMARKS.md, and the formula applied to a 7B model on 64 nodes.

    flock /tmp/evods-heavy.lock .venv/bin/python bench/resume_traffic.py [--ranks_per_node 2] [--before_tree DIR]

A 2 nodes × 4 ranks job (tp=2, pp=2, dp=2: each node holds one model replica, as 8 GPUs with tp=2, pp=4 do; or 2 × 2
ranks, dp=1: a pipeline stage per node, half the processes) saves one bf16 checkpoint to the moto server, then a job
on two fresh nodes resumes it. Every request is counted by the server, per rank (evods' User-Agent names the rank).
`--before_tree` runs the resume with another evods checkout (e.g. `git archive <commit> | tar -x -C /tmp/evods-base`)
to measure the traffic before this change: its requests do not name ranks, so only the job's total is measured.
"""
import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADAM_ZERO_BYTES = 12  # per parameter: fp32 master weight, exp_avg and exp_avg_sq, partitioned over dp by ZeRO-1
CONFIG = """import os
exec(open({demo!r}).read())
model.update(hidden_size={hidden}, num_layers={layers}, num_attention_heads=8, vocab_size={vocab},
             mlp_ratio=8 / 3, dtype="torch.bfloat16")
data.update(seq_len=64, micro_bsz=1, micro_num=2, total_steps={steps})
lr_scheduler.update(total_steps=4)
parallel.update(tensor=2, pipeline=dict(size=2))
ckpt.update(enable_save_ckpt=True, save_ckpt_folder={folder!r}, checkpoint_every={every}, auto_resume=True)
"""


def shard_parameters(hidden: int, layers: int, vocab: int, pp: int, tp: int) -> tuple[dict[tuple[int, int], int], int]:
    """Parameters held by the rank at (stage s, tensor rank t): each stage's share of the model (embedding on the
    first, norm and head on the last, decoder layers evenly), split weights / tp, replicated ones whole; and the
    model's parameter count. Counted on the real model (meta device) with evods' tensor-parallel plan."""
    import torch

    from evods.model import InternLMForCausalLM, config_from_model_dict
    from evods.parallel import TensorParallelSplit

    config = config_from_model_dict(dict(hidden_size=hidden, num_layers=layers, num_attention_heads=32 if hidden >= 4096
                                         else 8, vocab_size=vocab, mlp_ratio=8 / 3))
    with torch.device("meta"):
        model = InternLMForCausalLM(config)
    counts = defaultdict(int)
    tensor_split = TensorParallelSplit.of(config, tp, embed_split_hidden=True)
    for name, parameter in model.named_parameters():
        if name.startswith("model.layers."):
            stage = int(name.split(".")[2]) // (layers // pp)
        else:
            stage = 0 if "embed_tokens" in name else pp - 1
        split = tensor_split.split_dim(name) is not None
        for t in range(tp):
            counts[(stage, t)] += parameter.numel() // tp if split else parameter.numel()
    return dict(counts), model.num_parameters()


def formula(shards: dict[tuple[int, int], int], dp: int, weight_bytes: int) -> dict:
    """Bytes of a resume at the same layout, per rank and per node (one replica per node), without the KB-sized run
    state and engine files; before: every rank downloads the whole checkpoint (every shard's file)."""
    pp_tp = len(shards)
    per_rank = {key: weight_bytes * count + ADAM_ZERO_BYTES * count / dp for key, count in shards.items()}
    node = sum(per_rank.values())
    checkpoint = (weight_bytes + ADAM_ZERO_BYTES) * sum(shards.values())
    return {"per_rank": per_rank, "node": node, "total": dp * node, "before_rank": checkpoint,
            "before_total": dp * pp_tp * checkpoint}


def run_job(root: Path, name: str, steps: int, every: int, folder: str, env: dict, server, bucket: str,
            script: str | None = None) -> list:
    from testkit.cluster import TRAIN, launch, make_nodes

    nodes = make_nodes(root / name, 2)
    # the demo config of the tree that trains: another checkout's evods may not know this one's keys
    demo = str(Path(script or TRAIN).parent / "configs" / "demo_cpu.py")
    for node in nodes:
        (node.workdir / "config.py").write_text(CONFIG.format(demo=demo, hidden=ARGS.hidden, layers=ARGS.layers,
                                                              vocab=ARGS.vocab, steps=steps, every=every,
                                                              folder=folder))
    before = len(server.requests(bucket))
    launch("torch", nodes, ARGS.ranks_per_node, ["--config", "config.py", "--run_dir", "run"], env, timeout=1200,
           script=script or TRAIN)
    return server.requests(bucket)[before:]


def gets_of(requests, prefix: str) -> list:
    return [r for r in requests if r.method == "GET" and r.key.startswith(prefix)]


def main() -> None:
    from testkit.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, CountingMotoServer, create_bucket

    server = CountingMotoServer()
    host, port = server.get_host_and_port()
    bucket = create_bucket(f"http://{host}:{port}")
    folder = f"boto3:s3://{bucket}.{host}:{port}/run"
    env = {"S3_ACCESS_KEY_ID": ACCESS_KEY_ID, "S3_SECRET_ACCESS_KEY_ID": SECRET_ACCESS_KEY, "http_proxy": "",
           "HTTP_PROXY": "", "https_proxy": "", "HTTPS_PROXY": ""}
    root = Path(tempfile.mkdtemp(prefix="evods-bench-traffic-"))
    run_job(root, "save", 1, 1, folder, env, server, bucket)
    marker = json.loads(bytes(server_read(host, port, bucket, "run/1/1.step")))
    checkpoint_bytes = sum(entry["size"] for entry in marker["files"].values())
    resumed = gets_of(run_job(root, "resume", 2, 1000, folder, env, server, bucket), "run/1/")
    before = None
    if ARGS.before_tree:
        before = gets_of(run_job(root, "before", 2, 1000, folder, env, server, bucket,
                                 script=str(Path(ARGS.before_tree) / "train_ds.py")), "run/1/")
    server.stop()

    world = 2 * ARGS.ranks_per_node
    shards, parameters = shard_parameters(ARGS.hidden, ARGS.layers, ARGS.vocab, pp=2, tp=2)
    predicted = formula(shards, dp=world // 4, weight_bytes=2)
    print(f"model: hidden {ARGS.hidden}, {ARGS.layers} layers, vocab {ARGS.vocab}, bf16: {parameters / 1e6:.2f} M "
          f"parameters, {sum(shards.values()) / 1e6:.2f} M held over the 4 (stage, tensor) shards; "
          f"checkpoint {checkpoint_bytes / 2**20:.1f} MiB in {len(marker['files'])} files\n")
    print("| rank | node | (stage, tensor, data) | GETs | downloaded MiB | formula MiB |")
    print("|---|---|---|---|---|---|")
    measured_node, predicted_node = defaultdict(int), defaultdict(float)
    for rank in range(world):
        mine = [r for r in resumed if r.rank == rank]
        got = sum(r.body_bytes for r in mine)
        stage, tensor, data, node = (rank // 2) % 2, rank % 2, rank // 4, rank // ARGS.ranks_per_node
        measured_node[node] += got
        predicted_node[node] += predicted["per_rank"][(stage, tensor)]
        print(f"| {rank} | {node} | ({stage}, {tensor}, {data}) | {len(mine)} | {got / 2**20:.2f} | "
              f"{predicted['per_rank'][(stage, tensor)] / 2**20:.2f} |")
    total = sum(r.body_bytes for r in resumed)
    print(f"\nper node: measured {[round(b / 2**20, 2) for b in measured_node.values()]} MiB, formula "
          f"{[round(b / 2**20, 2) for b in predicted_node.values()]} MiB; job total: measured {total / 2**20:.2f} MiB "
          f"in {len(resumed)} GETs, formula {sum(predicted_node.values()) / 2**20:.2f} MiB")
    if before is not None:
        print(f"before this change: measured {sum(r.body_bytes for r in before) / 2**20:.2f} MiB in {len(before)} "
              f"GETs, formula {predicted['before_total'] / 2**20:.2f} MiB (every rank the whole checkpoint)")

    seven_b, parameters = shard_parameters(4096, 32, 103168, pp=4, tp=2)
    big = formula(seven_b, dp=64, weight_bytes=2)
    print(f"\n7B (hidden 4096, 32 layers, vocab 103168: {parameters / 1e9:.2f} B parameters), bf16, "
          "64 nodes x 8 GPUs, tp=2 pp=4 dp=64:")
    print(f"  per rank: before {big['before_rank'] / 1e9:.1f} GB; after {min(big['per_rank'].values()) / 1e9:.2f}-"
          f"{max(big['per_rank'].values()) / 1e9:.2f} GB")
    print(f"  per node: before {8 * big['before_rank'] / 1e9:.0f} GB; after {big['node'] / 1e9:.1f} GB")
    print(f"  job total: before {big['before_total'] / 1e12:.1f} TB; after {big['total'] / 1e12:.2f} TB")


def server_read(host: str, port: int, bucket: str, key: str) -> bytes:
    from testkit.s3_server import s3_client

    return s3_client(f"http://{host}:{port}").get_object(Bucket=bucket, Key=key)["Body"].read()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--ranks_per_node", type=int, choices=(2, 4), default=4,
                        help="4: dp=2, each node one replica (as 8 GPUs with tp=2, pp=4); 2: dp=1, a stage per node")
    parser.add_argument("--before_tree", default=None, help="an evods checkout to resume with, for the traffic "
                                                            "before this change")
    ARGS = parser.parse_args()
    main()
