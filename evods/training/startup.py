"""The start-up lines of InternEvo's log, in its words, so that a run's log starts as the quickstart's does.

InternEvo prints "Distributed environment is initialized" once, from the log rank (launch.py, `launch`), "initialized
seed on rank" on every rank (ParallelContext.set_seed), and "===========New Run" on every rank (train.py, `main`),
or "Resume training from" / "SFT training from" when a checkpoint is loaded. evods prints the per-rank lines from the
logging rank only, unless EVODS_VERBOSE=1 (`train_ds.py --verbose`): then from every rank, as InternEvo.
"""
import logging
import socket
from datetime import datetime

import torch.distributed as dist

from evods.checkpoint import LoadPlan
from evods.console import is_verbose
from evods.parallel import ParallelLayout, parallel_seeds
from evods.parallel.nodes import NodeLayout, describe_layout, tensor_groups_across_nodes

# The ranks that print these lines print them whatever level setup_logging gives the root logger on that rank.
logger = logging.getLogger("evods.startup")
logger.setLevel(logging.INFO)


def launch_time() -> datetime:
    """Rank 0's clock on every rank: it names the run folder and stamps the New Run line."""
    stamp = [datetime.now()]
    if dist.is_initialized():
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def log_parallel_setup(layout: ParallelLayout, seed: int, rank: int) -> None:
    if layout.is_log_rank:
        logger.info("Distributed environment is initialized, data parallel size: %d, pipeline parallel size: %d, "
                    "tensor parallel size: %d%s", layout.dp, layout.pp, layout.tp,
                    f", isp (Ulysses sequence parallel) size: {layout.sp}" if layout.sp > 1 else "")
    if not (layout.is_log_rank or is_verbose()):
        return
    seeds = ", ".join(f"ParallelMode.{mode}: {value}" for mode, value in parallel_seeds(seed, layout).items())
    # InternEvo's fixed wording, down to the missing space after the last seed; like current InternEvo, evods moves
    # torch's generator to the TENSOR seed once the model is built (trainer.seed_runtime_rng).
    logger.info("initialized seed on rank %d, numpy: %d, python random: %d, %s,the default parallel seed is "
                "ParallelMode.DATA.", rank, seed, seed, seeds)


def log_layout(nodes: NodeLayout, layout: ParallelLayout) -> None:
    """Where the ranks landed (rank 0, once), and a warning when a tensor group spans nodes: its all-reduces, two
    per layer and step, would then cross the network."""
    if dist.get_rank() != 0:
        return
    logger.info("rank layout: %s", describe_layout(nodes, layout))
    row_width = layout.tp * layout.sp  # the tensor ranks, or the isp ranks with their all-to-alls
    spanning = tensor_groups_across_nodes(nodes, row_width)
    if spanning:
        logger.warning("%d tensor-parallel groups span nodes (e.g. ranks %s): launch a multiple of parallel.tensor=%d "
                       "ranks per node so that each group stays inside one", len(spanning), spanning[0], row_width)


def log_run_start(layout: ParallelLayout, launched: datetime, load_plan: LoadPlan | None) -> None:
    """`load_plan`: the checkpoint the run starts from, if any (its weights only, or also the run's state)."""
    if not (layout.is_log_rank or is_verbose()):
        return
    when, host = launched.strftime("%b%d_%H-%M-%S"), socket.gethostname()
    if load_plan is None:
        logger.info("===========New Run %s on host:%s,tp:%d,pp=%d,dp=%d===========", when, host, layout.tp_rank,
                    layout.pp_rank, layout.dp_rank)
    else:
        start = "SFT training" if load_plan.content == {"model"} else "Resume training"
        logger.info("===========%s from `%s` %s on host:%s===========", start, load_plan.describe(), when, host)
