"""Two nodes on one machine (testkit/cluster.py): a job's life across node counts, with checkpoints on S3.

One story, five real launches with 2 ranks per node and tp=2 (fp32, the same data and schedule throughout):
  1. 1 node × 4 ranks (torchrun), pp=2: the reference, 8 steps, nothing saved.
  2. 2 nodes × 2 ranks (torchrun), pp=2: 3 steps, saves step 2 to S3 with background uploads from every node.
  3. 2 fresh nodes (deepspeed launcher), pp=2: resume step 2 with empty local disks, train to 4, save 4.
  4. 1 fresh node × 2 ranks (torchrun), pp=1: resume step 4 (a 2-node checkpoint), train to 6, save 6.
  5. 2 fresh nodes (slurm), pp=2: resume step 6 (a 1-node checkpoint), train to 8.
Every S3 request is counted at the server, per rank (evods puts the rank in its User-Agent).
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from evods.parallel import parallel_layout
from evods.parallel.nodes import NodeLayout, describe_layout, tensor_groups_across_nodes
from testkit.cluster import launch, make_nodes
from testkit.paths import REPO
from testkit.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, CountingMotoServer, create_bucket, s3_client

SCHEDULE_STEPS = 8
SAVED = "run"  # the save folder's prefix in the bucket
CONFIG = """import os
exec(open({demo!r}).read())
model.update(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512, dtype="torch.float32")
data.update(seq_len=32, micro_bsz=2, micro_num=2, total_steps={steps})
lr_scheduler.update(total_steps={schedule}, warmup_ratio=0.25)
parallel.update(tensor=2, pipeline=dict(size={pipeline}))
ckpt.update(enable_save_ckpt={save}, save_ckpt_folder={folder!r}, checkpoint_every=2, auto_resume=True,
            async_upload=True, async_upload_tmp_folder=os.path.join(os.environ["TMPDIR"], "upload"),
            stop_file_path="stop")
enable_tb = True
"""
LAYOUT_2x2 = ("rank layout: 2 nodes, 4 ranks: node 0 = ranks 0-1 (dp 0, pp 0, tp 0-1); "
              "node 1 = ranks 2-3 (dp 0, pp 1, tp 0-1)")
CONVERTING = "to DeepSpeed's universal checkpoint"


def write_config(nodes, steps: int, pipeline: int, folder: str, save: bool = True) -> None:
    """Each node reads its own copy of the config, from its working directory."""
    demo = str(REPO / "configs" / "demo_cpu.py")
    for node in nodes:
        (node.workdir / "config.py").write_text(CONFIG.format(demo=demo, steps=steps, schedule=SCHEDULE_STEPS,
                                                              pipeline=pipeline, folder=folder, save=save))


def losses(nodes) -> list[float]:
    """The losses of metrics.jsonl, on whichever node the logging rank ran."""
    logs = [node.workdir / "run" / "metrics.jsonl" for node in nodes]
    logs = [log for log in logs if log.exists()]
    assert len(logs) == 1, f"metrics.jsonl on {len(logs)} nodes: only the logging rank writes it"
    return [json.loads(line)["loss"] for line in logs[0].read_text().splitlines()]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def plant_crashed_save(node) -> list[Path]:
    """What a crashed save leaves: a DeepSpeed staging folder in TMPDIR and one in the async upload folder."""
    pid = dead_pid()
    planted = [node.tmp / f"evods-ckpt-2-rank0-pid{pid}-x1y2", node.tmp / "upload" / f"evods-ckpt-2-rank1-pid{pid}-z3"]
    for folder in planted:
        (folder / "deepspeed").mkdir(parents=True)
        (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    return planted


class Traffic:
    """The S3 requests of one launch, by rank."""

    def __init__(self, requests, folder: str):
        self.requests = [r for r in requests if r.key.startswith(f"{SAVED}/{folder}/") or r.key == ""]
        self.folder = folder

    def gets(self, rank: int) -> dict[str, int]:
        """{file of the checkpoint folder: response bytes} of the object GETs of `rank`."""
        prefix = f"{SAVED}/{self.folder}/"
        return {r.key[len(prefix):]: r.body_bytes for r in self.requests
                if r.rank == rank and r.method == "GET" and r.key.startswith(prefix)}

    def get_count(self, rank: int) -> int:
        return sum(1 for r in self.requests if r.rank == rank and r.method == "GET" and r.key)

    def listing_ranks(self) -> set:
        return {r.rank for r in self.requests if r.method == "GET" and r.key == ""}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """The five launches; what each test below checks."""
    server = CountingMotoServer()
    host, port = server.get_host_and_port()
    bucket = create_bucket(f"http://{host}:{port}")
    folder = f"boto3:s3://{bucket}.{host}:{port}/{SAVED}"
    env = {"S3_ACCESS_KEY_ID": ACCESS_KEY_ID, "S3_SECRET_ACCESS_KEY_ID": SECRET_ACCESS_KEY,
           "http_proxy": "", "HTTP_PROXY": "", "https_proxy": "", "HTTPS_PROXY": "",
           # every rank's lines: each node's leader says that it converts (by default only rank 0 logs warnings)
           "EVODS_VERBOSE": "1"}
    root = tmp_path_factory.mktemp("cluster")
    args = ["--config", "config.py", "--run_dir", "run"]
    found = {"bucket": bucket}
    try:
        one_node = make_nodes(root / "reference", 1)
        write_config(one_node, SCHEDULE_STEPS, 2, folder, save=False)
        launch("torch", one_node, 4, args, env)
        found["reference"] = losses(one_node)

        two_nodes = make_nodes(root / "first", 2)
        write_config(two_nodes, 3, 2, folder)
        found["first"] = launch("torch", two_nodes, 2, args, env)
        found["first_nodes"], found["first_losses"] = two_nodes, losses(two_nodes)
        uploads = server.requests(bucket)
        found["uploaded"] = {r.key[len(f"{SAVED}/2/"):]: r.rank for r in uploads
                             if r.method == "PUT" and r.key.startswith(f"{SAVED}/2/")}
        marker = s3_client(f"http://{host}:{port}").get_object(Bucket=bucket, Key=f"{SAVED}/2/2.step")["Body"].read()
        found["sizes"] = {name: entry["size"] for name, entry in json.loads(marker)["files"].items()}

        resumed_nodes = make_nodes(root / "resumed", 2)
        found["planted"] = [path for node in resumed_nodes for path in plant_crashed_save(node)]
        write_config(resumed_nodes, 4, 2, folder)
        before = len(server.requests(bucket))
        found["resumed"] = launch("deepspeed", resumed_nodes, 2, args, env)
        found["resumed_nodes"], found["resumed_losses"] = resumed_nodes, losses(resumed_nodes)
        found["resume_traffic"] = Traffic(server.requests(bucket)[before:], "2")

        single = make_nodes(root / "single", 1)
        write_config(single, 6, 1, folder)
        before = len(server.requests(bucket))
        found["single"] = launch("torch", single, 2, args, env)
        found["single_losses"] = losses(single)
        found["single_traffic"] = Traffic(server.requests(bucket)[before:], "4")

        regrown = make_nodes(root / "regrown", 2)
        write_config(regrown, SCHEDULE_STEPS, 2, folder)
        before = len(server.requests(bucket))
        found["regrown"] = launch("slurm", regrown, 2, args, env)
        found["regrown_losses"] = losses(regrown)
        found["regrown_traffic"] = Traffic(server.requests(bucket)[before:], "6")
        found["saved_deepspeed"] = {step: {r.key.split("/", 2)[2] for r in server.requests(bucket) if r.method == "PUT"
                                           and r.key.startswith(f"{SAVED}/{step}/deepspeed/") and r.key.endswith(".pt")}
                                    for step in ("4", "6")}
        yield found
    finally:
        server.stop()


def test_two_nodes_train_exactly_like_one_node_with_the_same_ranks(story):
    assert story["first_losses"] == story["reference"][:3]  # fp32: bitwise, whatever the node split
    assert len(set(story["reference"])) == SCHEDULE_STEPS, "training moves"


def test_all_three_launchers_place_the_ranks_alike(story):
    # tensor ranks inside a node, then pipeline stages, then data: InternEvo's layout, DeepSpeed's groups agreeing
    for job in ("first", "resumed", "regrown"):
        assert LAYOUT_2x2 in story[job].outputs[0], story[job].output()[-3000:]
        assert "span nodes" not in story[job].output()


def deepspeed_reads(written: set) -> set:
    """What DeepSpeed reads on a rank that wrote `written` (dp=1: a rank's own files), at the same layout: those,
    and the first file of each list it globs to check the count (mp_rank_00, tensor rank 0's file of each layer)."""
    first_of_layer = {re.sub(r"-model_\d+-", "-model_00-", name) for name in written if "/layer_" in name}
    return written | first_of_layer | {"deepspeed/mp_rank_00_model_states.pt"}


def test_resume_on_empty_disks_downloads_only_what_each_rank_reads(story):
    traffic, uploaded, sizes = story["resume_traffic"], story["uploaded"], story["sizes"]
    assert story["resumed_losses"] == story["reference"][2:4]  # exact: weights, Adam state, data order, RNG
    assert traffic.listing_ranks() == {0}, "rank 0 alone lists the storage and shares what it found"
    shared = {"context.pt", "sampler.pt", "schedulers.pt"}
    planning = {"2.step", "config.json", "topology.json"}  # rank 0's reads, before it shares the answers
    for node_ranks in ([0, 1], [2, 3]):
        fetched = [name for rank in node_ranks for name in traffic.gets(rank)]
        assert len(fetched) == len(set(fetched)), f"a file downloaded twice on the node of ranks {node_ranks}"
        written = {name for name, writer in uploaded.items() if writer in node_ranks}
        expected = deepspeed_reads({name for name in written if name.startswith("deepspeed/")})
        assert set(fetched) - planning == expected | shared | {f"rng/rank{rank}.pt" for rank in node_ranks}
    for rank in range(4):
        own = {name for name, writer in uploaded.items() if writer == rank and name.startswith("deepspeed/")}
        assert len(own) >= 4, own  # its engine state, its layers' weights, its ZeRO-1 partition
        gets = traffic.gets(rank)
        reads = deepspeed_reads(own) | shared | {f"rng/rank{rank}.pt"} | (planning if rank == 0 else set())
        assert set(gets) <= reads, (rank, sorted(set(gets) - reads))
        assert traffic.get_count(rank) == len(gets), "one GET per file"
        assert all(size == sizes[name] for name, size in gets.items() if name != "2.step"), "whole files, once"
    per_rank = [sum(traffic.gets(rank).values()) for rank in range(4)]
    checkpoint = sum(size for name, size in sizes.items() if name.endswith(".pt"))
    assert max(per_rank) < checkpoint / 2, f"bytes per rank {per_rank}, of a checkpoint of {checkpoint}"


def test_resume_leaves_nothing_on_node_disks_and_each_file_on_its_node(story):
    for path in story["planted"]:
        assert not path.exists(), f"a crashed save's staging folder {path} is still there"
    first = story["first_nodes"]
    assert (first[0].workdir / "stop").read_text() == "0", "rank 0 reads the stop file, on its own node"
    assert not (first[1].workdir / "stop").exists()
    # metrics, TensorBoard and the DeepSpeed config belong to the logging rank (the last stage, on node 1)
    assert not (first[0].workdir / "run").exists()
    assert {p.name for p in (first[1].workdir / "run").iterdir()} == {"metrics.jsonl", "tensorboard",
                                                                      "ds_config.json"}
    for node in [*first, *story["resumed_nodes"]]:
        assert not [p.name for p in node.tmp.iterdir() if p.name.startswith("evods-")], "scratch folders are gone"
        assert not list((node.tmp / "upload").iterdir()), "uploads are done and their files deleted"


def test_two_nodes_resume_on_one_and_one_node_on_two(story):
    # 2 -> 1 node: the 2-stage checkpoint loads on one stage, as the pipeline-resharding resume does
    assert story["single_losses"] == pytest.approx(story["reference"][4:6], abs=1e-5, rel=0)
    single = story["single_traffic"]
    everything = story["saved_deepspeed"]["4"]
    assert {name for name in single.gets(0) if name.startswith("deepspeed/")} == everything
    assert not [name for name in single.gets(1) if name.startswith("deepspeed/")]
    assert story["single"].output().count(CONVERTING) == 1
    # 1 -> 2 nodes: each node converts the checkpoint once, from one download on its leader
    assert story["regrown_losses"] == pytest.approx(story["reference"][6:8], abs=1e-5, rel=0)
    regrown = story["regrown_traffic"]
    everything = story["saved_deepspeed"]["6"]
    for leader, other in ((0, 1), (2, 3)):
        assert {name for name in regrown.gets(leader) if name.startswith("deepspeed/")} == everything
        assert not [name for name in regrown.gets(other) if name.startswith("deepspeed/")]
    assert [output.count(CONVERTING) for output in story["regrown"].outputs] == [1, 1]


# (tp, pp, sp) on 2 nodes of 2 ranks: the layout line, and DeepSpeed's axes whose groups stay inside a node / span
# both (under isp, DeepSpeed's data axis is the isp ranks of a stage)
@pytest.mark.parametrize("tp, pp, sp, expected, inside, across", [
    (2, 1, 1, "node 0 = ranks 0-1 (dp 0, pp 0, tp 0-1); node 1 = ranks 2-3 (dp 1, pp 0, tp 0-1)", ["model", "pipe"],
     ["data"]),
    (1, 2, 1, "node 0 = ranks 0-1 (dp 0, pp 0-1, tp 0); node 1 = ranks 2-3 (dp 1, pp 0-1, tp 0)", ["model", "pipe"],
     ["data"]),
    (1, 2, 2, "node 0 = ranks 0-1 (dp 0, pp 0, isp 0-1); node 1 = ranks 2-3 (dp 0, pp 1, isp 0-1)",
     ["model", "data"], ["pipe"]),
])
def test_layout_of_two_nodes_of_two_ranks(tp, pp, sp, expected, inside, across):
    from evods.parallel import build_process_topology

    nodes = NodeLayout(0, (0, 0, 1, 1), ("a:/tmp", "b:/tmp"))
    layout = parallel_layout(0, 4, pp, tp, sp)
    assert describe_layout(nodes, layout) == f"2 nodes, 4 ranks: {expected}"
    assert tensor_groups_across_nodes(nodes, tp * sp) == []
    # evods' DeepSpeed topology (mpu.LayoutTopology) places every rank where InternEvo's layout does
    topology = build_process_topology(layout)
    for rank in range(4):
        coord, placed = topology.get_coord(rank), layout.at(rank)
        assert (coord.data, coord.pipe, coord.model) == (placed.zero_rank, placed.pp_rank, placed.tp_rank)
    nodes_of = lambda group: {nodes.node_of_rank[rank] for rank in group}  # noqa: E731
    assert all(len(nodes_of(group)) == 1 for axis in inside for group in topology.get_axis_comm_lists(axis))
    assert all(len(nodes_of(group)) == 2 for axis in across for group in topology.get_axis_comm_lists(axis))


def test_a_tensor_group_across_nodes_is_found():
    nodes = NodeLayout(0, (0, 0, 0, 1, 1, 1), ("a:/tmp", "b:/tmp"))  # 3 ranks per node with tp=2
    assert tensor_groups_across_nodes(nodes, 2) == [[2, 3]]
