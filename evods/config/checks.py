"""Checks that need facts from outside the file: the world size, the device, the installed kernels.

They run once the process group exists (InternEvo checks these in launch.py too), and fail with a ConfigError that
names the config keys involved.
"""
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable

import torch

from evods.parallel import ParallelLayout, parallel_layout

from .schema import TrainConfig

logger = logging.getLogger("evods.config")

# fp16 on CPU runs (slowly) only once DeepSpeed's accelerator is told fp16 is supported: DeepSpeed's
# CPU_Accelerator.is_fp16_supported is true only where torch.ops.mkldnn._is_mkldnn_fp16_supported() is (few CPUs),
# and DeepSpeedEngine otherwise raises "Type fp16 is not supported on your device". Tests use it to exercise loss
# scaling; with it set, the engine must patch `get_accelerator().is_fp16_supported = lambda: True` before
# deepspeed.initialize.
CPU_FP16_ENV = "EVODS_CPU_FP16"


def check_topology(cfg: TrainConfig, world_size: int, rank: int = 0) -> ParallelLayout:
    """The run's parallel layout, seen from `rank`: `world_size` processes split into data × pipeline × tensor
    parallel groups, the parallel modes that apply, checked against the model and data. Every parallel decision is
    made here, once; the rest of evods reads the layout."""
    pp, tp, sp = cfg.parallel.pipeline.size, cfg.parallel.tensor.size, 1
    if cfg.parallel.tensor.mode == "isp":  # the tensor ranks share rows instead of weights
        tp, sp = 1, tp
    model, source = cfg.model, cfg.source
    if world_size % (pp * tp * sp):
        raise source.error("parallel", f"{world_size} processes cannot be split into pipeline {pp} × tensor "
                                       f"{tp * sp} groups: the world size must be a multiple of {pp * tp * sp}; "
                                       f"change parallel.pipeline/parallel.tensor or the number of processes")
    if model.num_layers < pp:
        raise source.error("parallel.pipeline", f"model.num_layers={model.num_layers} is less than parallel.pipeline "
                                                f"size {pp}: every pipeline stage needs at least one layer")
    if cfg.data.micro_num < pp:
        raise source.error("data.micro_num", f"data.micro_num={cfg.data.micro_num} is less than parallel.pipeline "
                                             f"size {pp}: a 1F1B pipeline needs at least one micro-batch per stage; "
                                             f"raise micro_num")
    if model.num_chunks > 1:
        raise source.error("model.num_chunks", f"model.num_chunks={model.num_chunks} asks for InternEvo's interleaved "
                                               f"pipeline, but DeepSpeed pipelines run 1F1B only; set num_chunks=1")
    zero = cfg.parallel.zero  # its stage resolved, and its combinations checked, when the config was loaded
    if sp > 1:
        _check_rows_split(cfg, "parallel.tensor", 'parallel.tensor.mode="isp"', f"parallel.tensor size {sp}", sp)
    layout = parallel_layout(rank, world_size, pp=pp, tp=tp, sp=sp,
                             sequence_parallel=_check_sequence_parallel(cfg, tp),
                             zero_stage=zero.stage, offload_optimizer=zero.offload_optimizer,
                             offload_param=zero.offload_param)
    stage = layout.zero_stage
    zero1 = cfg.parallel.zero1.size
    if zero1 == 1:
        logger.info("parallel.zero1=1 asks for no ZeRO, but evods still uses ZeRO-%d over the data-parallel group: "
                    "DeepSpeed's non-ZeRO optimizers compute wrong gradient norms under pipeline/tensor parallelism.",
                    stage)
    elif zero1 > 1 and zero1 != layout.zero_ranks:
        logger.warning("parallel.zero1=%d: DeepSpeed ZeRO-%d shards over the whole data-parallel group (%d ranks), "
                       "not over groups of %d.", zero1, stage, layout.zero_ranks, zero1)
    return layout


def _check_sequence_parallel(cfg: TrainConfig, tp: int) -> bool:
    """Whether sequence parallelism applies: it splits each row's tokens over the tensor ranks, so it needs tensor
    size > 1 (InternEvo ignores it there too) and rows whose length that size divides."""
    if not cfg.parallel.sequence_parallel:
        return False
    if tp == 1:
        logger.warning("parallel.sequence_parallel=True has no effect with parallel.tensor size 1: it splits the "
                       "tokens over the tensor-parallel ranks")
        return False
    _check_rows_split(cfg, "parallel.sequence_parallel", "parallel.sequence_parallel=True",
                      f"parallel.tensor size {tp}", tp)
    return True


def _check_rows_split(cfg: TrainConfig, key: str, asked: str, over: str, size: int) -> None:
    """Sequence parallelism (`asked`, config key `key`) splits each packed row's tokens over `size` ranks (`over`):
    the training rows and the validation rows must be multiples of it."""
    data = cfg.data
    tokens = data.micro_bsz * data.seq_len
    if tokens % size:
        raise cfg.source.error(key, f"{asked} splits each micro-batch's data.micro_bsz × data.seq_len = "
                                    f"{data.micro_bsz} × {data.seq_len} = {tokens} tokens over {over}, which does "
                                    f"not divide them; make micro_bsz × seq_len a multiple of {size}")
    if data.valid_every > 0 and data.seq_len % size:
        raise cfg.source.error(key, f"{asked} splits each validation row's data.seq_len={data.seq_len} tokens over "
                                    f"{over}, which does not divide them; make seq_len a multiple of {size} (or set "
                                    f"data.valid_every=0)")


def cpu_fp16_forced() -> bool:
    return os.environ.get(CPU_FP16_ENV) == "1"


def torch_has_varlen_attention() -> bool:
    """torch >= 2.10 ships flash attention's varlen kernel itself (torch.nn.attention.varlen, CUDA only)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def offloads_to_cpu_adam(cfg: TrainConfig, device_type: str) -> bool:
    """Whether the optimizer runs as DeepSpeed's CPU Adam: with optimizer offload on an accelerator that is not the
    CPU itself. There DeepSpeed requires it (`zero_force_ds_cpu_optimizer`): its AVX kernel steps the host-side fp32
    shards. On the CPU accelerator everything is in host memory already and torch's AdamW steps the same shards with
    no compiled op (its first JIT build takes minutes on a small machine)."""
    return cfg.parallel.zero.offload_optimizer and device_type != "cpu"


def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's cpu_adam op cannot be loaded here, or None when it can: built into the installed DeepSpeed
    (DS_BUILD_CPU_ADAM=1), or compiled on first use (JIT), which needs DeepSpeed's compatibility check to pass,
    ninja and a C++ compiler."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if installed_ops.get("cpu_adam"):
        return None
    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed reports its cpu_adam op incompatible with this machine"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "the installed DeepSpeed lacks the cpu_adam op and ninja, which its JIT build needs, is missing"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"the installed DeepSpeed lacks the cpu_adam op and no C++ compiler ({compiler}) can build it"
    logger.info("DeepSpeed's cpu_adam op is not prebuilt: DeepSpeed compiles it when the optimizer is built (once per "
                "machine, cached under TORCH_EXTENSIONS_DIR; minutes)")
    return None


def check_device(cfg: TrainConfig, device_type: str, flash_attn_available: bool | None = None,
                 torch_varlen_available: bool | None = None,
                 find_cpu_adam_problem: Callable[[], str | None] = cpu_adam_problem) -> None:
    """Fit the config to the device: without flash-attn, `use_flash_attn` means torch's own varlen flash kernel on
    CUDA, and falls back to the PyTorch SDPA path elsewhere (one warning); a dtype the device cannot train in, or an
    optimizer offload whose DeepSpeed op cannot load, is an error. `device_type` is DeepSpeed's accelerator name
    ("cuda", "cpu", ...)."""
    model = cfg.model
    if offloads_to_cpu_adam(cfg, device_type):
        problem = find_cpu_adam_problem()
        if problem is not None:
            raise cfg.source.error("parallel.zero.offload_optimizer",
                                   f"parallel.zero.offload_optimizer=True steps the optimizer with DeepSpeed's CPU "
                                   f"Adam, but {problem}; reinstall deepspeed with DS_BUILD_CPU_ADAM=1 (or install "
                                   f"ninja and a C++ compiler), or set offload_optimizer=False")
    if flash_attn_available is None:
        flash_attn_available = importlib.util.find_spec("flash_attn") is not None
    if torch_varlen_available is None:
        torch_varlen_available = torch_has_varlen_attention()
    if model.use_flash_attn and not flash_attn_available:
        if device_type == "cuda" and torch_varlen_available:
            logger.info("flash-attn is not installed: packed attention uses torch's own varlen flash kernel.")
        else:
            logger.warning("model.use_flash_attn=True but flash-attn is not installed (or not usable on %s): "
                           "using the PyTorch attention path instead.", device_type)
            model.use_flash_attn = False
    if device_type == "cpu" and model.dtype == torch.float16 and not cpu_fp16_forced():
        raise cfg.source.error("model.dtype", f'model.dtype torch.float16 cannot train on the CPU; use '
                                              f'"torch.bfloat16", "torch.float32" or "torch.tf32" (runs as fp32) '
                                              f'there, or set {CPU_FP16_ENV}=1 to force slow fp16 (for tests)')
