"""Training configs: InternEvo-style Python files in, typed and checked objects out, plus the DeepSpeed JSON.

    cfg = load_config("configs/7B_sft.py")           # file -> TrainConfig (ConfigError on any problem)
    layout = check_topology(cfg, world_size, rank)   # -> evods.parallel.ParallelLayout, every parallel decision
    check_device(cfg, "cpu")                         # dtype / flash-attn against the device
    ds = build_deepspeed_config(cfg, layout, override_path)
"""
from .checks import CPU_FP16_ENV, check_device, check_topology, cpu_fp16_forced
from .deepspeed_config import (
    adamw_kwargs,
    build_deepspeed_config,
    reduce_bucket_elements,
    validate_deepspeed_config,
    write_deepspeed_config,
)
from .errors import ConfigError
from .loader import ConfigSource, load_config_file
from .schema import (
    CKPT_TYPES,
    SNAPSHOT_FOLDER,
    AdamConfig,
    AlertConfig,
    Beta2SchedulerConfig,
    CkptConfig,
    DataConfig,
    Fp16ScaleConfig,
    GradScalerConfig,
    HybridZeroConfig,
    LoadCkptInfo,
    LossConfig,
    LrSchedulerConfig,
    ModelConfig,
    MonitorConfig,
    ParallelConfig,
    PipelineConfig,
    TensorConfig,
    TrainConfig,
    load_config,
    parse_config,
)

__all__ = [
    "AdamConfig", "AlertConfig", "Beta2SchedulerConfig", "CkptConfig", "ConfigError", "ConfigSource", "CPU_FP16_ENV",
    "CKPT_TYPES", "DataConfig", "Fp16ScaleConfig", "GradScalerConfig", "HybridZeroConfig", "LoadCkptInfo", "LossConfig",
    "LrSchedulerConfig", "ModelConfig", "MonitorConfig", "ParallelConfig", "PipelineConfig", "SNAPSHOT_FOLDER",
    "TensorConfig", "TrainConfig", "adamw_kwargs", "build_deepspeed_config", "check_device", "check_topology",
    "cpu_fp16_forced", "load_config", "load_config_file", "parse_config", "reduce_bucket_elements",
    "validate_deepspeed_config", "write_deepspeed_config",
]
