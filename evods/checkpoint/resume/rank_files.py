"""Which files of a remote evods checkpoint each rank reads, and which rank of a node downloads each of them.

A resume at the saved layout reads, on the rank at (dp d, pp p, tp t; under isp d is the ZeRO rank, one of dp × sp),
only what DeepSpeed's engine and evods load there (DeepSpeed's names, deepspeed/runtime/engine.py and
pipe/module.py; m = p * tp + t, the rank's position in its data-parallel slice, which DeepSpeed calls the
model-parallel rank):

    deepspeed/mp_rank_{m}_model_states.pt                   engine state (and, without a pipeline, the model)
    deepspeed/layer_{i}-model_{t}-model_states.pt           with a pipeline: the layers i of stage p
    deepspeed/zero_pp_rank_{d}_mp_rank_{m}_model_states.pt  under ZeRO-3, instead of mp_rank_{m}: engine state
    deepspeed/[bf16_]zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt   its ZeRO partition (DeepSpeed reads only the
                                                            rank's own one unless elastic_checkpoint is set; under
                                                            ZeRO-3 it holds the rank's shard of the weights)
    context.pt, sampler.pt, schedulers.pt                   the run state, as the plan's content asks
    rng/rank{r}.pt                                          its RNG states, when the saving run had rank r

DeepSpeed also reads the first file of each list it globs, to check the count (SDLoaderBase.check_ckpt_list in
deepspeed/runtime/state_dict_factory.py): mp_rank_00, and tensor rank 0's file of each of the rank's layers. With
tensor ranks inside a node (InternEvo's layout) the node reads those anyway, so they cost no extra download.

A resume at another data or pipeline size converts the whole DeepSpeed folder once per node (reshard.py), so the
node's leader reads every DeepSpeed file. Loading the model weights alone reads every model file (the tensor ranks
are merged; a ZeRO-3 checkpoint keeps its weights in the optimizer partitions, so all of those). A file that several
ranks of a node read is downloaded once, by one of them, into the node's folder.
"""
import re
from collections.abc import Iterable

from evods.parallel import ParallelLayout

from .. import layout

_MODULE_FILE = re.compile(r"^deepspeed/mp_rank_(\d+)_model_states\.pt$")
_LAYER_FILE = re.compile(r"^deepspeed/layer_(\d+)-model_(\d+)-model_states\.pt$")
_ZERO_FILE = re.compile(r"^deepspeed/(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODULE_FILE = re.compile(r"^deepspeed/zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def deepspeed_files(files: Iterable[str]) -> list[str]:
    """The files DeepSpeed wrote (model states, ZeRO partitions)."""
    return sorted(rel for rel in files if rel.startswith(f"{layout.DEEPSPEED_TAG}/") and rel.endswith(".pt"))


def model_files(files: Iterable[str]) -> list[str]:
    """The files that hold model weights: the layer files of a pipeline, else the module files, else (ZeRO-3) every
    rank's model states (the parameter names and shapes) and optimizer partitions (the weights)."""
    files = list(files)
    layers = [rel for rel in files if _LAYER_FILE.match(rel)]
    modules = [rel for rel in files if _MODULE_FILE.match(rel)]
    zero3 = [rel for rel in files if _ZERO3_MODULE_FILE.match(rel) or _ZERO_FILE.match(rel)]
    return sorted(layers or modules or zero3)


def own_deepspeed_files(files: Iterable[str], parallel: ParallelLayout, stage_layers: range | None) -> list[str]:
    """The DeepSpeed files a resume at the saved layout reads on the rank `parallel` is seen from (see the module
    doc); `stage_layers`: the PipelineModule layer indices of its stage, None without a pipeline."""
    model_rank = parallel.pp_rank * parallel.tp + parallel.tp_rank
    chosen = set()
    for rel in files:
        if (match := _MODULE_FILE.match(rel)) and int(match.group(1)) in (model_rank, 0):
            chosen.add(rel)
        elif (match := _LAYER_FILE.match(rel)) and stage_layers is not None \
                and int(match.group(1)) in stage_layers and int(match.group(2)) in (parallel.tp_rank, 0):
            chosen.add(rel)
        elif (match := _ZERO_FILE.match(rel) or _ZERO3_MODULE_FILE.match(rel)) and \
                (int(match.group(1)), int(match.group(2))) == (parallel.zero_rank, model_rank):
            chosen.add(rel)
    return sorted(chosen)


def run_state_files(files: Iterable[str], rank: int, content: frozenset) -> list[str]:
    """The evods run-state files `_restore_evods` reads on `rank` for the plan's `content`."""
    wanted = {layout.CONTEXT, layout.rng_file(rank)}
    if "sampler" in content:
        wanted.add(layout.SAMPLER)
    if "scheduler" in content:
        wanted.add(layout.SCHEDULERS)
    return sorted(wanted.intersection(files))


def assign_downloads(reads: dict[int, list[str]], sizes: dict[str, int | None]) -> dict[int, list[str]]:
    """Which rank of a node downloads which file: each file the node's ranks (`reads`: rank -> files it reads) read
    is downloaded once, by one of the ranks that read it, the one with the fewest bytes to fetch so far (largest
    files first). Every rank of the node computes the same answer from the same input."""
    assigned = {rank: [] for rank in reads}
    load = {rank: 0 for rank in reads}
    readers_of: dict[str, list[int]] = {}
    for rank in sorted(reads):
        for rel in reads[rank]:
            readers_of.setdefault(rel, []).append(rank)
    for rel in sorted(readers_of, key=lambda rel: (-(sizes.get(rel) or 0), rel)):
        rank = min(readers_of[rel], key=lambda candidate: (load[candidate], candidate))
        assigned[rank].append(rel)
        load[rank] += sizes.get(rel) or 1  # unknown sizes (a listing without sizes) still spread by count
    return {rank: sorted(files) for rank, files in assigned.items()}
