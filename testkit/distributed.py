"""Run a test body on N local ranks with gloo, one fresh process per rank (DeepSpeed's CPU accelerator and
pytest's own process do not mix).

Test bodies are module-level functions; each rank gets RANK/WORLD_SIZE/MASTER_* in its environment and returns a
picklable result. A failing rank raises here with its traceback.
"""
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report every failure, including SystemExit from a clear-error path
        queue.put((rank, "err", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world=2, args=(), timeout=300):
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, payload = queue.get(timeout=1)
            except queue_module.Empty as empty:
                # A rank that died without reporting (killed, or failed before its try) must not cost the timeout.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    code = procs[dead[0]].exitcode
                    raise RuntimeError(f"rank {dead[0]} exited with code {code} without a result") from empty
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result from ranks {sorted(set(range(world)) - set(results))} "
                                       f"after {timeout} s") from empty
                continue
            if status == "err":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
