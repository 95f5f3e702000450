"""Loading an evods checkpoint saved at another data- or pipeline-parallel size or ZeRO stage, with no separate
conversion step.

Model weights and the ZeRO optimizer state go through DeepSpeed's universal checkpoint: each node's leader (its
lowest rank, evods.parallel.nodes) converts the saved DeepSpeed files (ds_to_universal, in-process) into a folder on
the node's local disk, once per node, renames the per-parameter folders
from the saved model's parameter names to this run's (a pipeline names parameters by stage layer, the plain model by
HF name), and every rank loads that with `load_universal`. Tensor-parallel changes are refused (DeepSpeed cannot
merge replicated parameters of tensor-parallel checkpoints); the model weights alone load at any tensor size
(formats/weights.py, deepspeed_weights, merges the tensor ranks). The sampler position is translated to the new data
size.
"""
import argparse
import logging
import os
import shutil

import torch.distributed as dist

from evods.parallel import pipeline_parameter_name
from evods.parallel.nodes import NodeLayout

from ..collective import agree_on_failure, barrier, node_scratch_folder
from ..errors import CheckpointError
from ..layout import DEEPSPEED_TAG
from ..safe_load import deepspeed_loads_weights_only

logger = logging.getLogger("evods.checkpoint")
UNIVERSAL_TAG = "universal"
# The file DeepSpeed reads a universal checkpoint's run metadata from (deepspeed/runtime/engine.py, _get_ckpt_name with
# the universal load's placeholders); ds_to_universal copies the saved run's, named for the saved stage.
MODEL_STATES = {False: "mp_rank_00_model_states.pt", True: "zero_pp_rank_0_mp_rank_00_model_states.pt"}


def saved_zero_stage(topology: dict) -> int:
    """The ZeRO stage of a checkpoint's topology.json; checkpoints from before evods ran ZeRO-2/3 lack it (ZeRO-1)."""
    return topology.get("zero_stage", 1)


def check_reshardable(saved: dict, now: dict, source: str) -> bool:
    """True when the optimizer state needs resharding (data or pipeline size, or ZeRO stage, changed)."""
    if saved["tp"] != now["tp"]:
        raise CheckpointError(
            f"{source} was saved with tensor size {saved['tp']} and this run has {now['tp']}: the optimizer state "
            "does not reshard across tensor sizes. The model weights do: load them alone to continue with a fresh "
            f"optimizer (ckpt.load_ckpt_info=dict(path='{source}', content=('model',), ckpt_type='evods') and "
            "auto_resume=False)")
    return (saved["dp"], saved["pp"], saved_zero_stage(saved)) != (now["dp"], now["pp"], now["zero_stage"])


def load_resharded(engine, checkpoint_folder: str, source: str, saved: dict, now: dict, nodes: NodeLayout) -> None:
    """Load model weights and optimizer state of the evods checkpoint `source`, copied locally at
    `checkpoint_folder` (on `nodes`' leaders: its DeepSpeed files are there) and saved at topology `saved`, into the
    DeepSpeed `engine` of this run (topology `now`)."""
    cache = node_scratch_folder(nodes, "universal")
    current_names = _current_names(engine, saved["num_layers"])

    def convert_on_node_leader():
        if nodes.is_leader:
            logger.warning("checkpoint %s was saved with dp=%d, pp=%d, ZeRO-%d and this run has dp=%d, pp=%d, "
                           "ZeRO-%d: converting it to DeepSpeed's universal checkpoint in %s and loading that", source,
                           saved["dp"], saved["pp"], saved_zero_stage(saved), now["dp"], now["pp"],
                           now["zero_stage"], cache)
            _convert(os.path.join(checkpoint_folder, DEEPSPEED_TAG), os.path.join(cache, UNIVERSAL_TAG),
                     _ParameterNames(saved["num_layers"], saved["pp"] > 1), current_names, now["zero_stage"])

    # ds_to_universal and DeepSpeed's universal loading call torch.load(weights_only=False) themselves
    with deepspeed_loads_weights_only():
        agree_on_failure(f"converting {source} to a universal checkpoint", convert_on_node_leader)
    # DeepSpeed reads this flag only inside load_checkpoint; setting it for this one load leaves the run's config
    # (and its later saves) as they are.
    config = engine._config
    config.load_universal_checkpoint, previous = True, config.load_universal_checkpoint
    try:
        with deepspeed_loads_weights_only():
            path, _ = engine.load_checkpoint(cache, tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = previous
    barrier()
    if nodes.is_leader:
        shutil.rmtree(cache, ignore_errors=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint made from {checkpoint_folder}")


def reshard_sampler_state(state: dict, dp: int, source: str) -> dict:
    """The sampler state at the same global position for `dp` data ranks: a step reads a contiguous block of the
    shuffled order across the ranks, so the samples consumed so far are `per-rank count x data size`. A stream's
    position (evods.data.loader.StreamingTrainLoader) is the same for any data size."""
    if "stream" in state:
        return {**state, "data_world_size": dp}
    consumed = state["num_consumed_samples_in_epoch"] * state["data_world_size"]
    if consumed % dp:
        raise CheckpointError(f"{source}: {consumed} samples of this pass were consumed, which {dp} data ranks "
                              "cannot split evenly; resume with a data size that divides it")
    # A new data size usually comes with a new micro_num (same global batch), so the per-rank batch is not checked.
    kept = {key: value for key, value in state.items() if key != "batch_size"}
    return {**kept, "data_world_size": dp, "num_consumed_samples_in_epoch": consumed // dp}


class _ParameterNames:
    """DeepSpeed's parameter names of a model: HF names, or `{stage layer}.{local name}` in a PipelineModule."""

    def __init__(self, num_layers: int, pipelined: bool):
        self.num_layers = num_layers
        self.pipelined = pipelined

    def hf_name(self, name: str) -> str:
        if not self.pipelined:
            return name
        stage_index, local_name = name.split(".", 1)
        return pipeline_parameter_name(int(stage_index), local_name, self.num_layers)


def _current_names(engine, num_layers: int) -> dict[str, str]:
    """{HF name: this engine's name} of every parameter of this run (all stages: each rank may convert for all)."""
    from deepspeed.pipe import PipelineModule

    pipelined = isinstance(engine.module, PipelineModule)
    names = _ParameterNames(num_layers, pipelined)
    local = [name for name, _ in engine.module.named_parameters()]
    if pipelined:  # another stage's parameters are not in this module: name them from the layer count
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = sorted({name for names_of_rank in gathered for name in names_of_rank})
    return {names.hf_name(name): name for name in local}


def _convert(deepspeed_folder: str, output: str, saved_names: _ParameterNames, current: dict[str, str],
             zero_stage: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(output, ignore_errors=True)
    # one worker each: no process pools inside a training process
    ds_to_universal.main(argparse.Namespace(input_folder=deepspeed_folder, output_folder=output,
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))
    zero = os.path.join(output, "zero")
    staged = os.path.join(output, "zero_saved_names")
    os.rename(zero, staged)
    os.makedirs(zero)
    for name in os.listdir(staged):
        if not os.path.isdir(os.path.join(staged, name)):  # optimizer_state.pt: the common optimizer state
            os.rename(os.path.join(staged, name), os.path.join(zero, name))
            continue
        hf_name = saved_names.hf_name(name)
        if hf_name not in current:
            raise CheckpointError(f"parameter {name} ({hf_name}) of the checkpoint has no counterpart in this run's "
                                  "model: the model sizes differ")
        os.rename(os.path.join(staged, name), os.path.join(zero, current[hf_name]))
    shutil.rmtree(staged)
    _fit_to_stage(output, zero_stage)


def _fit_to_stage(output: str, zero_stage: int) -> None:
    """Make the universal checkpoint `output`, converted from a checkpoint of another ZeRO stage, loadable under
    `zero_stage`. The weights and Adam states come from zero/ whatever the stages, but DeepSpeed 0.19's
    ds_to_universal writes what the saving stage's loader reads:
    - the run metadata file, which the loading engine looks for under its own stage's name;
    - from ZeRO-3: each zero/<parameter>/<state>.pt a bare tensor, where ZeRO-1/2's loader wants {"param": tensor};
      Adam's step count only in the common optimizer state, where that loader reads a step.pt per parameter; and
      no DeepSpeed version in the common state, which that loader asserts ("Empty ds_version in checkpoint");
    - from ZeRO-1/2: the step count and hyperparameters where ZeRO-3's loader does not look (it reads both from the
      common state's optimizer_state_dict).
    Files are read weights-only (the caller runs this within deepspeed_loads_weights_only)."""
    import torch
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS

    wanted, saved = MODEL_STATES[zero_stage == 3], MODEL_STATES[zero_stage != 3]
    if os.path.isfile(os.path.join(output, wanted)):
        return  # saved under the same stage family (ZeRO-1 and ZeRO-2 write the same files)
    shutil.copyfile(os.path.join(output, saved), os.path.join(output, wanted))
    zero = os.path.join(output, "zero")
    common_path = os.path.join(zero, "optimizer_state.pt")
    common = torch.load(common_path, weights_only=True)
    folders = [os.path.join(zero, name) for name in sorted(os.listdir(zero)) if os.path.isdir(os.path.join(zero, name))]
    if zero_stage == 3:
        step = torch.load(os.path.join(folders[0], "step.pt"), weights_only=True)  # the same for every parameter
        common.setdefault(OPTIMIZER_STATE_DICT, {"state": {0: {"step": step}}, PARAM_GROUPS: common[PARAM_GROUPS]})
    else:
        common.setdefault(DS_VERSION, torch.load(os.path.join(output, saved), weights_only=True)[DS_VERSION])
        step = common[OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for folder in folders:
            for state in os.listdir(folder):
                tensor = torch.load(os.path.join(folder, state), weights_only=True)
                if isinstance(tensor, torch.Tensor):
                    torch.save({PARAM: tensor}, os.path.join(folder, state))
            torch.save(step, os.path.join(folder, "step.pt"))
    torch.save(common, common_path)
