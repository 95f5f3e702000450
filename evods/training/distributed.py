"""Process-group start-up for the three launchers users have: deepspeed, torchrun and slurm. DeepSpeed and torch are
imported where they are used, so that `train_ds.py --help` answers at once."""
import datetime
import os
import re
import socket

LAUNCHERS = ("deepspeed", "torch", "slurm")


class LaunchError(RuntimeError):
    """The processes were not started the way --launcher says."""


def first_host(nodelist: str) -> str:
    """The first host of a slurm node list ("node[01-04,07],gpu5" -> "node01"), as InternEvo picks its master.
    Read here rather than with `scontrol show hostnames`: containers started under slurm often lack scontrol."""
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()).group(0)  # up to the first comma outside brackets
    return re.sub(r"\[([^\]]*)\]", lambda bracket: re.split(r"[,-]", bracket.group(1))[0], entry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_launcher_env(launcher: str, port: int | None = None, environ=os.environ) -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from what the launcher provides.

    deepspeed and torchrun export them already; slurm exports SLURM_* instead (InternEvo's default launcher);
    a plain `python train_ds.py` gets a one-process group.
    """
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher == "slurm":
        if "SLURM_PROCID" not in environ:
            raise LaunchError("--launcher slurm needs SLURM_PROCID: start it with `srun ... python train_ds.py`")
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NPROCS"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        environ.setdefault("MASTER_ADDR", first_host(nodelist) if nodelist else "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(port or 8888))
        return
    if "RANK" not in environ:  # plain python: a one-process run
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        environ.setdefault("MASTER_PORT", str(port or _free_port()))


def prepare_deepspeed_for_device(allow_cpu_fp16: bool = False) -> None:
    """Work around what DeepSpeed gets wrong on CPU machines.

    - The shm all-reduce op is JIT-compiled (30 s) at init although training never uses it: switch it off.
    - The CPU accelerator reports fp16 as unsupported; fp16 still computes correctly, only slowly, so tests
      of the loss-scaling path may opt in.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if allow_cpu_fp16:
            get_accelerator().is_fp16_supported = lambda: True


def init_distributed(launcher: str = "deepspeed", port: int | None = None, timeout_s: int = 1800) -> None:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from evods.config import cpu_fp16_forced

    set_launcher_env(launcher, port)
    prepare_deepspeed_for_device(allow_cpu_fp16=cpu_fp16_forced())
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        backend = accelerator.communication_backend_name()
        if backend == "nccl":
            # evods reduces small bookkeeping tensors (stop flags, metrics, counters) on the CPU; gloo carries those,
            # nccl the tensors on the GPU.
            backend = "cpu:gloo,cuda:nccl"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
