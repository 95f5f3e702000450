"""A simulated cluster on this machine: real launchers, one per node, each node with its own local disk.

A node is a working directory with its own temp folder (TMPDIR: downloads, reshard caches, staging) and its own
async-upload folder; its launcher runs there with `python train_ds.py` from the repository. The nodes talk over
127.0.0.1, as hosts of one cluster talk over their network:
- torchrun: `--nnodes N --node_rank i --master_addr 127.0.0.1 --master_port P` (static rendezvous; port 0 hangs);
- deepspeed: `--hostfile` of N hosts with `--no_ssh --node_rank i --num_nodes N` (the runner then starts its
  launch.py for node i only, deepspeed/launcher/runner.py);
- slurm: one `python train_ds.py --launcher slurm` per rank with the SLURM_* variables `srun -N N` sets.
"""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testkit.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train_ds.py")
LAUNCHERS = ("torch", "deepspeed", "slurm")


@dataclass(frozen=True)
class Node:
    index: int
    workdir: Path  # the launcher's working directory: relative paths of the config land here

    @property
    def tmp(self) -> Path:
        return self.workdir / "tmp"

    @property
    def log(self) -> Path:
        return self.workdir / "launcher.log"

    def env(self) -> dict:
        return {"TMPDIR": str(self.tmp), "OMP_NUM_THREADS": "1"}


def make_nodes(root: Path, count: int) -> list[Node]:
    """`count` nodes with empty local disks under `root`."""
    nodes = [Node(index, root / f"node{index}") for index in range(count)]
    for node in nodes:
        node.tmp.mkdir(parents=True)
    return nodes


@dataclass(frozen=True)
class Job:
    nodes: list[Node]
    outputs: list[str]  # each node's launcher output (all its ranks)

    def output(self) -> str:
        return "\n".join(f"===== node {node.index}\n{text}" for node, text in zip(self.nodes, self.outputs))


def _commands(launcher: str, nodes: list[Node], ranks_per_node: int, args: list[str],
              script: str) -> list[tuple[Node, list, dict]]:
    """(node, argv, extra environment) of each process to start: one launcher per node, or one process per rank
    for slurm (srun's part)."""
    port, count = free_port(), len(nodes)
    if launcher == "torch":
        return [(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(count), "--node_rank",
                        str(node.index), "--nproc_per_node", str(ranks_per_node), "--master_addr", "127.0.0.1",
                        "--master_port", str(port), script, *args, "--launcher", "torch"], {}) for node in nodes]
    if launcher == "deepspeed":
        commands = []
        for node in nodes:
            hostfile = node.workdir / "hostfile"
            hostfile.write_text("".join(f"node{index} slots={ranks_per_node}\n" for index in range(count)))
            commands.append((node, [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile),
                                    "--no_ssh", "--node_rank", str(node.index), "--num_nodes", str(count),
                                    "--master_addr", "127.0.0.1", "--master_port", str(port), script, *args], {}))
        return commands
    if launcher == "slurm":
        world = count * ranks_per_node
        common = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NNODES": str(count),
                  "SLURM_JOB_NODELIST": f"127.0.0.[1-{count}]", "SLURM_NPROCS": str(world),
                  "SLURM_NTASKS": str(world), "SLURM_TASKS_PER_NODE": f"{ranks_per_node}(x{count})"}
        return [(node, [sys.executable, script, *args, "--launcher", "slurm", "--port", str(port)],
                 {**common, "SLURM_NODEID": str(node.index), "SLURM_PROCID": str(node.index * ranks_per_node + local),
                  "SLURM_LOCALID": str(local), "SLURMD_NODENAME": f"node{node.index}"})
                for node in nodes for local in range(ranks_per_node)]
    raise ValueError(f"unknown launcher {launcher!r}; one of {LAUNCHERS}")


def launch(launcher: str, nodes: list[Node], ranks_per_node: int, args: list[str], env: dict | None = None,
           timeout: float = 400, script: str = TRAIN) -> Job:
    """Run one job across `nodes` (`script`, train_ds.py, with `args`) and wait for it; AssertionError with every
    node's output when a process fails or the job outlasts `timeout`."""
    for node in nodes:
        node.log.write_text("")
    processes = []
    for node, argv, extra in _commands(launcher, nodes, ranks_per_node, args, script):
        log = open(node.log, "a")
        processes.append((node, log, subprocess.Popen(
            argv, cwd=node.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {}), **node.env(), **extra})))
    deadline = time.monotonic() + timeout
    try:
        while any(process.poll() is None for _, _, process in processes):
            failed = [process for _, _, process in processes if process.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for _, log, process in processes:
            if process.poll() is None:  # a failed peer or the deadline: end this job's own process groups
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
    job = Job(nodes, [node.log.read_text() for node in nodes])
    codes = [process.returncode for _, _, process in processes]
    assert codes == [0] * len(codes), f"{launcher} job failed (exit codes {codes}):\n{job.output()[-12000:]}"
    return job
