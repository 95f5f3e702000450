"""The DeepSpeed JSON of a run: evods' fixed settings (deepspeed_defaults.json, beside this module, so it ships in the
package), the values derived from the training config, then an optional user JSON (`--ds_config FILE`) deep-merged on
top. ds_configs/README.md explains every key."""
import copy
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from evods.parallel import ParallelLayout

from .errors import ConfigError
from .schema import TrainConfig

logger = logging.getLogger("evods.config")

DEFAULTS_PATH = Path(__file__).with_name("deepspeed_defaults.json")
EFFECTIVE_NAME = "ds_config.json"

SEQUENCE_SLICES_BETWEEN_STAGES = ("each tensor rank sends its own slice of the tokens to the next pipeline stage "
                                  "(parallel.sequence_parallel), which DeepSpeed's partitioned transfer would mix up: "
                                  "it assumes every tensor rank holds the same activations")
# Settings of the defaults that evods' loop depends on, with the reason an override would break it.
FIXED_BY_EVODS = {
    "train_micro_batch_size_per_gpu": "one micro-batch is one packed row of data.micro_bsz × data.seq_len tokens",
    "pipeline.pipe_partitioned": SEQUENCE_SLICES_BETWEEN_STAGES,
    "pipeline.grad_partitioned": SEQUENCE_SLICES_BETWEEN_STAGES,
}
# Derived keys that only the training config may set, because evods builds the run around them, with the keys that
# set them: the batch geometry (the loop feeds data.micro_num rows per step) and the ZeRO stage and offload (the model
# construction, the optimizer and the checkpoints follow them).
SET_IN_TRAINING_CONFIG = {
    "train_micro_batch_size_per_gpu": "data.micro_num / data.micro_bsz",
    "gradient_accumulation_steps": "data.micro_num / data.micro_bsz",
    "train_batch_size": "data.micro_num / data.micro_bsz",
    "zero_optimization.stage": "parallel.zero.stage",
    "zero_optimization.offload_optimizer.device": "parallel.zero.offload_optimizer",
    "zero_optimization.offload_param.device": "parallel.zero.offload_param",
}


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: {what} is not valid JSON: {error.msg}") from None


def _leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, name = dotted.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursing into dicts both have; neither input is changed."""
    merged = copy.deepcopy(base)
    for name, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def reduce_bucket_elements(cfg: TrainConfig, layout: ParallelLayout) -> int:
    """The gradient reduce bucket DeepSpeed gets, in elements: hybrid_zero_optimizer.reduce_bucket_size, except that
    under ZeRO-3 it is at most hidden_size² (transformers' DeepSpeed "auto" value). InternEvo's optimizer and
    DeepSpeed's stages 1/2 fill their bucket as gradients arrive, but DeepSpeed's stage-3 optimizer allocates the whole
    bucket up front (contiguous_gradients, deepspeed/runtime/zero/stage3.py): InternEvo's 512M elements would be
    2 GiB per rank in fp32, more than ZeRO-3 saves on most models."""
    given = cfg.hybrid_zero_optimizer.reduce_bucket_size
    return min(given, cfg.model.hidden_size ** 2) if layout.zero_stage == 3 else given


def _derived(cfg: TrainConfig, layout: ParallelLayout) -> dict[str, tuple[Any, str]]:
    """Dotted DeepSpeed key -> (value, the training config key it comes from)."""
    data, zero, scaler = cfg.data, cfg.hybrid_zero_optimizer, cfg.grad_scaler
    derived = {
        "gradient_accumulation_steps": (data.micro_num, "data.micro_num"),
        # DeepSpeed's data-parallel world is every rank holding the same weights: dp × the isp ranks of a row
        "train_batch_size": (data.micro_num * layout.zero_ranks, "data.micro_num × data-parallel size"),
        "zero_optimization.reduce_bucket_size": (reduce_bucket_elements(cfg, layout),
                                                 "hybrid_zero_optimizer.reduce_bucket_size"),
        "gradient_clipping": (float(zero.clip_grad_norm), "hybrid_zero_optimizer.clip_grad_norm"),
        **_zero_stage(cfg, layout),
    }
    if layout.sequence_parallel and layout.pp > 1:
        derived.update({"pipeline.pipe_partitioned": (False, SEQUENCE_SLICES_BETWEEN_STAGES),
                        "pipeline.grad_partitioned": (False, SEQUENCE_SLICES_BETWEEN_STAGES)})
    if cfg.model.dtype == torch.float16:
        power = math.log2(scaler.fp16.initial_scale)
        if not power.is_integer():
            raise cfg.source.error("grad_scaler.fp16.initial_scale",
                                   f"grad_scaler.fp16.initial_scale={scaler.fp16.initial_scale} must be a power of 2 "
                                   f"(DeepSpeed takes initial_scale_power), e.g. 2**16")
        if (scaler.growth_factor, scaler.backoff_factor) != (2, 0.5):
            logger.warning("grad_scaler: DeepSpeed's loss scaler doubles and halves the scale; growth_factor=%s and "
                           "backoff_factor=%s are not used.", scaler.growth_factor, scaler.backoff_factor)
        logger.info("grad_scaler.max_scale=%s is not enforced: DeepSpeed's loss scaler has no upper bound.",
                    scaler.max_scale)
        derived.update({
            "fp16.enabled": (True, "model.dtype"),
            "fp16.initial_scale_power": (int(power), "grad_scaler.fp16.initial_scale"),
            "fp16.loss_scale_window": (scaler.fp16.growth_interval, "grad_scaler.fp16.growth_interval"),
            "fp16.hysteresis": (scaler.hysteresis, "grad_scaler.hysteresis"),
            # InternEvo restores the hysteresis budget only when the scale grows, not after every good step
            "fp16.consecutive_hysteresis": (False, "grad_scaler.hysteresis"),
            "fp16.min_loss_scale": (scaler.fp16.min_scale, "grad_scaler.fp16.min_scale"),
        })
    elif cfg.model.dtype == torch.bfloat16:
        derived.update({
            "bf16.enabled": (True, "model.dtype"),
            # fp32 gradient accumulation: DeepSpeed then runs its BF16_Optimizer with ZeRO-1 partitioned fp32 master
            # weights, whose losses and gradient norms under data and pipeline parallelism match one process's
            # (tests/training/test_parity.py); bf16 accumulation over micro_num steps loses precision.
            "data_types.grad_accum_dtype": ("fp32", "model.dtype"),
        })
    return derived


def _zero_stage(cfg: TrainConfig, layout: ParallelLayout) -> dict[str, tuple[Any, str]]:
    """The layout's ZeRO stage and offload, with the config keys that asked for them."""
    source = "parallel.zero1.fsdp" if cfg.parallel.zero1.fsdp else "parallel.zero.stage"
    derived = {"zero_optimization.stage": (layout.zero_stage, source)}
    if layout.offload_optimizer:
        derived["zero_optimization.offload_optimizer.device"] = ("cpu", "parallel.zero.offload_optimizer")
        # evods hands DeepSpeed the optimizer: DeepSpeed's CPU Adam on GPUs, torch's AdamW where the accelerator is
        # the CPU itself (evods.config.checks.offloads_to_cpu_adam); DeepSpeed would refuse the latter by default.
        derived["zero_force_ds_cpu_optimizer"] = (False, "parallel.zero.offload_optimizer")
    if layout.offload_param:
        derived["zero_optimization.offload_param.device"] = ("cpu", "parallel.zero.offload_param")
    if layout.zero_stage == 3:
        # transformers' DeepSpeed "auto" values: DeepSpeed's fixed defaults (a 50M-element prefetch, 100k-element
        # persistent parameters) suit neither a small model nor a 70B one
        hidden, reason = cfg.model.hidden_size, "sized from model.hidden_size as transformers' DeepSpeed 'auto'"
        derived["zero_optimization.stage3_prefetch_bucket_size"] = (int(0.9 * hidden ** 2), reason)
        derived["zero_optimization.stage3_param_persistence_threshold"] = (10 * hidden, reason)
    return derived


def _check_override(user: dict, evods: dict[str, tuple[Any, str]], origin: str) -> None:
    for dotted, value in _leaves(user):
        ours, reason = evods.get(dotted, (None, None))
        if ours == value or (reason is None and dotted not in SET_IN_TRAINING_CONFIG):
            continue
        if dotted in SET_IN_TRAINING_CONFIG:
            given = f" ({reason} gives {ours!r})" if reason else ""
            raise ConfigError(f"{origin}: {dotted}={value!r} conflicts with the training config{given}; remove it "
                              f"from the DeepSpeed JSON and set {SET_IN_TRAINING_CONFIG[dotted]} in the training "
                              f"config instead")
        if dotted in FIXED_BY_EVODS:
            raise ConfigError(f"{origin}: {dotted}={value!r} cannot be overridden: {reason}. Remove it from the "
                              "DeepSpeed JSON")
        logger.warning("%s: %s=%r overrides %r from the training config (%s).", origin, dotted, value, ours, reason)


def build_deepspeed_config(cfg: TrainConfig, layout: ParallelLayout, override_path: str | Path | None = None) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize(config=...)`, for the run's parallel `layout`
    (evods.config.check_topology).

    One DeepSpeed micro-batch is one packed row (micro_bsz × seq_len tokens), so the micro-batch size is 1 and
    gradient accumulation is data.micro_num. Precision follows model.dtype: fp16 with dynamic loss scaling from
    grad_scaler, bf16 with fp32 gradient accumulation, fp32 (and tf32, which is fp32 plus TF32 matmuls set by the
    engine) with neither.

    The optimizer is deliberately NOT in the JSON: build `torch.optim.AdamW(params, **adamw_kwargs(cfg))` (DeepSpeed's
    CPU Adam in AdamW mode under optimizer offload on GPUs) and pass it to `deepspeed.initialize(optimizer=...)`.
    evods changes lr and beta2 on its param_groups every step (its own schedules, so the JSON has no scheduler
    either), and InternEvo's optimizer is exactly torch AdamW.

    `override_path`: a JSON file deep-merged on top. Overriding a value that comes from the training config warns;
    overriding the batch geometry is an error, since the loop feeds data.micro_num rows per step.
    """
    defaults = _read_json(DEFAULTS_PATH, "evods' DeepSpeed defaults")
    derived = _derived(cfg, layout)
    ds_config = deep_merge(defaults, _nested({name: value for name, (value, _) in derived.items()}))
    if override_path is not None:
        user = _read_json(Path(override_path), "the --ds_config file")
        fixed = {name: (value, FIXED_BY_EVODS[name]) for name, value in _leaves(defaults) if name in FIXED_BY_EVODS}
        _check_override(user, {**fixed, **derived}, str(override_path))
        ds_config = deep_merge(ds_config, user)
    validate_deepspeed_config(ds_config, layout.zero_ranks, origin=str(override_path or DEFAULTS_PATH))
    return ds_config


def adamw_kwargs(cfg: TrainConfig) -> dict:
    """InternEvo's optimizer settings as `torch.optim.AdamW` keyword arguments."""
    adam = cfg.adam
    return dict(lr=adam.lr, betas=(adam.adam_beta1, adam.adam_beta2), eps=adam.adam_eps,
                weight_decay=adam.weight_decay)


def validate_deepspeed_config(ds_config: dict, dp_size: int, origin: str = "DeepSpeed config") -> None:
    """Check the dict with DeepSpeed's own config classes (strict pydantic models reject misspelt sub-keys).

    DeepSpeedConfig sizes the batch from the process group when one exists, so the batch arithmetic is checked here
    against `dp_size` and train_batch_size is left for DeepSpeed to derive.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    micro = ds_config.get("train_micro_batch_size_per_gpu")
    steps = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if total is not None and micro is not None and steps is not None and total != micro * steps * dp_size:
        raise ConfigError(f"{origin}: train_batch_size={total} must equal train_micro_batch_size_per_gpu ({micro}) × "
                          f"gradient_accumulation_steps ({steps}) × data-parallel size ({dp_size})")
    unsized = {name: value for name, value in ds_config.items() if name != "train_batch_size"}
    try:
        DeepSpeedConfig(unsized)
    except Exception as error:  # DeepSpeed raises pydantic, assertion and value errors alike
        raise ConfigError(f"{origin}: DeepSpeed rejects the config: {error}") from error


def write_deepspeed_config(ds_config: dict, run_dir: str | Path) -> Path:
    """Write the effective JSON to `run_dir/ds_config.json` (so a run can be reproduced) and return its path."""
    path = Path(run_dir) / EFFECTIVE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
