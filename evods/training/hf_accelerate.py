"""DeepSpeed through Hugging Face accelerate and transformers' Trainer: the recipe that counts processes right on CPU.

What goes wrong without it (accelerate 1.15, DeepSpeed 0.19, no CUDA):
- `accelerate launch --cpu --use_deepspeed` is refused ("only one of --cpu ... --use_deepspeed"). Without --cpu,
  accelerate finds no device backend: DeepSpeed starts gloo by itself, but accelerate reports num_processes 1 and
  process_index 0 on every rank, so a mean over processes (`accelerator.reduce`) is a sum, and DeepSpeed rejects
  the train_batch_size accelerate derives from that count. Naming the backend, gloo, makes accelerate count the
  processes (`InitProcessGroupKwargs(backend="gloo")`; for the Trainer, a PartialState made before
  TrainingArguments).
- DeepSpeed JIT-compiles its shm all-reduce op (30 s) at start-up though training never uses it: switched off.
- ZeRO-3 keeps each process's share of the weights only: a whole-model save (`accelerator.get_state_dict`) needs
  `stage3_gather_16bit_weights_on_model_save`, which accelerate leaves off unless told. Without it every rank trains
  to the end and then fails at the save, losing the run; the script says up front that it will save, and the key is
  then set before training.
- The batch keys: accelerate fills "auto" train_micro_batch_size_per_gpu only from a DataLoader passed to
  `prepare`, and turns an "auto" gradient_clipping into 1.0. evods' loader already deals the data to the ranks and is
  not prepared, so the keys are set here from the script's own values, and a launch config that disagrees is an
  error rather than a silent override.
"""
import datetime
import functools
import logging
import os
from contextlib import contextmanager

from evods.config import ConfigError

from .distributed import LaunchError, prepare_deepspeed_for_device

ACCELERATE_CONFIG_HINT = "accelerate launch --config_file examples/accelerate_zero1.yaml"
DIST_TIMEOUT = datetime.timedelta(minutes=30)
ZERO3_GATHER_KEY = "stage3_gather_16bit_weights_on_model_save"

logger = logging.getLogger("evods")


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def zero_stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_zero_stage(zero_stage: int, tensor_parallel: int) -> None:
    """ZeRO-2/3 partition gradients and weights over every process, blind to tensor-parallel shards."""
    if tensor_parallel > 1 and zero_stage >= 2:
        raise ConfigError(f"the accelerate config asks for ZeRO stage {zero_stage}, but the model is split by tensor "
                          f"parallelism (parallel.tensor={tensor_parallel}): ZeRO-2/3 would partition gradients and "
                          "weights across the tensor shards; set zero_stage: 1 in the accelerate config")


def enable_zero3_save(ds_config: dict) -> bool:
    """Under ZeRO-3, make the end-of-run save possible: the partitioned weights are gathered at save time (it costs
    nothing before the save). In place; True when that changed the config. accelerate writes the key as false unless
    zero3_save_16bit_model says otherwise (`accelerate config` asks, defaulting to no), so a false here is no
    decision to honour at the cost of the run."""
    zero = ds_config.get("zero_optimization", {})
    if zero_stage_of(ds_config) != 3 or zero.get(ZERO3_GATHER_KEY) is True:
        return False
    zero[ZERO3_GATHER_KEY] = True
    return True


def derive_batch_keys(ds_config: dict, micro_num: int, clip_grad_norm: float, data_parallel: int) -> None:
    """Set DeepSpeed's batch keys and clipping from the script's values, in place. One micro-batch is one packed row
    (micro-batch size 1), micro_num of them make a step; a value the launch config fixed otherwise is an error."""
    wanted = {
        "train_micro_batch_size_per_gpu": (1, "one micro-batch is one packed row"),
        "gradient_accumulation_steps": (micro_num, "micro_num"),
        "train_batch_size": (micro_num * data_parallel, f"micro_num × {data_parallel} data-parallel processes"),
        "gradient_clipping": (float(clip_grad_norm), "the script's gradient clipping (0: none)"),
    }
    for name, (value, origin) in wanted.items():
        current = ds_config.get(name, "auto")
        if current not in ("auto", None) and current != value:
            raise ConfigError(f"{name}={current!r} in the accelerate/DeepSpeed config conflicts with the script "
                              f"({origin} gives {value!r}); remove it from the launch config or set it to \"auto\"")
        ds_config[name] = value


def deepspeed_accelerator(micro_num: int, clip_grad_norm: float, tensor_parallel: int = 1, saves_model: bool = False):
    """An `accelerate.Accelerator` on the launch's DeepSpeed plugin (zero stage, offload, JSON of
    `accelerate launch`), with gradient accumulation over `micro_num` micro-batches and DeepSpeed's clipping.
    `saves_model`: the script saves the whole model at the end (under ZeRO-3 that needs the weights gathered)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        raise LaunchError("this script trains with accelerate's DeepSpeed plugin: start it with "
                          f"`{ACCELERATE_CONFIG_HINT} SCRIPT ...` (or `accelerate launch --use_deepspeed --zero_stage 1"
                          " ...`), not with --cpu")
    steps_from_launch = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps_from_launch not in (None, "auto", str(micro_num)):
        raise ConfigError(f"gradient_accumulation_steps={steps_from_launch} in the accelerate config conflicts with "
                          f"the script (micro_num gives {micro_num}); remove it from the accelerate config")
    prepare_deepspeed_for_device()
    plugin = DeepSpeedPlugin()  # reads what `accelerate launch` passed: zero stage, offload, a DeepSpeed JSON
    check_zero_stage(zero_stage_of(plugin.deepspeed_config), tensor_parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    derive_batch_keys(plugin.deepspeed_config, micro_num, clip_grad_norm, world // tensor_parallel)
    plugin.gradient_accumulation_steps, plugin.gradient_clipping = micro_num, float(clip_grad_norm)
    if saves_model and enable_zero3_save(plugin.deepspeed_config):
        plugin.zero3_save_16bit_model = True
        logger.info("ZeRO-3: %s set to true, so that the model can be saved at the end", ZERO3_GATHER_KEY)
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=DIST_TIMEOUT)] if _on_cpu() else []
    return Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=micro_num, kwargs_handlers=handlers)


@contextmanager
def deepspeed_with_mpu(mpu):
    """Within it, `accelerator.prepare` hands DeepSpeed evods' process groups (`mpu`, a ParallelGrid).

    accelerate passes an mpu to deepspeed.initialize only for its own sequence parallelism. Without one, ZeRO-1 would
    average gradients over every process, tensor-parallel shards included, and count replicated weights once per
    tensor rank in the gradient norm; with it, DeepSpeed reduces over the data-parallel group, as in train_ds.py.
    """
    import deepspeed

    initialize = deepspeed.initialize
    deepspeed.initialize = functools.partial(initialize, mpu=mpu)  # accelerate looks it up when it prepares
    try:
        yield
    finally:
        deepspeed.initialize = initialize


def trainer_accelerator_config() -> dict:
    """For transformers' Trainer with `--deepspeed`: call before building TrainingArguments and pass the result as
    `TrainingArguments(accelerator_config=...)`. On CPU it sets up the process state with gloo (see above), which
    the Trainer then uses; elsewhere it returns {} and changes nothing."""
    from accelerate import PartialState

    prepare_deepspeed_for_device()
    if not _on_cpu():
        return {}
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds its own state
    PartialState(backend="gloo", timeout=DIST_TIMEOUT)
    return {"use_configured_state": True}
