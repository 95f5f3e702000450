"""Will the model fit? An estimate of the bytes each rank needs, checked against free memory before the model is built,
so that a model too large for the machine ends in one line with the numbers instead of an allocator traceback.

Free memory: on CUDA, `torch.cuda.mem_get_info` of this rank's device (what other processes left free); on the CPU,
the host's MemAvailable (/proc/meminfo), capped by the cgroup's limit when the process runs in a container, and shared
by the ranks on this host. EVODS_MEMORY_LIMIT_GB replaces that measurement with the GiB each rank may use.
"""
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from evods.config import ConfigError, LossConfig, TrainConfig, reduce_bucket_elements
from evods.parallel import ParallelLayout

from .loss_kernels import auto_chunk_tokens

logger = logging.getLogger("evods")

MEMORY_LIMIT_ENV = "EVODS_MEMORY_LIMIT_GB"
TIGHT = 0.85  # above this share of the free memory, warn: the estimate is rough
GIB = 2**30
ADAM_AND_MASTER_BYTES = 12  # per parameter: fp32 master copy, Adam exp_avg and exp_avg_sq


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs. `build`: host memory while the model is built (the whole model in fp32 before tensor and
    pipeline parallelism split it; under ZeRO-3 this rank's shards and one module whole); the rest is training
    memory, of which `offloaded` lives in host memory (ZeRO offload) and the remainder on the device."""

    build: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    zero_stage: int = 1
    offloaded: int = 0

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def on_device(self) -> int:
        return self.training - self.offloaded

    def describe_training(self, dp: int) -> str:
        offload = f"; {readable(self.offloaded)} of it in host memory (offload)" if self.offloaded else ""
        return (f"weights {readable(self.weights)}, gradients {readable(self.gradients)}, fp32 master + Adam "
                f"{readable(self.optimizer)} (ZeRO-{self.zero_stage} over {dp}), activations "
                f"~{readable(self.activations)}{offload}")


def readable(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def _parameter_counts(model: torch.nn.Module, num_layers: int) -> tuple[int, int, int, int]:
    """(embedding, one decoder layer, final norm + head, total) parameters of the HF model."""
    embedding = layer = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if ".layers.0." in name:
            layer += param.numel()
        elif "embed_tokens" in name:
            embedding += param.numel()
    return embedding, layer, total - embedding - layer * num_layers, total


def head_loss_bytes(loss: LossConfig, tokens: int, hidden: int, local_vocab: int, width: int) -> int:
    """The output head and cross entropy of one micro-batch. loss.kernel="full": the logits, their fp32 copy in the
    loss and its gradient. Otherwise a chunk's fp32 logits and softmax, and fp32 gradients of the hidden states and
    of the head weight, kept from the forward to the backward."""
    if loss.kernel == "full":
        return tokens * local_vocab * (width + 8)
    chunk = min(tokens, loss.chunk_tokens or auto_chunk_tokens(local_vocab, hidden))
    return chunk * local_vocab * 8 + (tokens + local_vocab) * hidden * 4


def estimate_memory(cfg: TrainConfig, model: torch.nn.Module, layout: ParallelLayout) -> MemoryEstimate:
    """The rank of the heaviest pipeline stage, for the layout's ZeRO stage and offload (`_zero_state`), and roughly
    the activations of the micro-batches in flight. `model`: the whole model, best built on the meta device."""
    pp, tp = layout.pp, layout.tp
    data, dtype = cfg.data, cfg.model.dtype
    hidden, vocab = cfg.model.hidden_size, cfg.model.vocab_size
    embedding, layer, head, total = _parameter_counts(model, cfg.model.num_layers)
    width = torch.finfo(dtype).bits // 8
    layers = math.ceil(cfg.model.num_layers / pp)
    recomputed = int(cfg.model.checkpoint * layers)
    tokens = data.seq_len * data.micro_bsz // layout.sp  # one micro-batch is one packed row (isp: a 1/sp slice)
    # Per layer and token: about (5 + 12 / tp) activations of hidden size kept for backward (Megatron's count without
    # the attention scores, which flash-style kernels do not keep); a recomputed layer keeps only its input.
    per_layer = tokens * hidden * width * (5 + 12 / tp)
    kept = recomputed * tokens * hidden * width + (layers - recomputed) * per_layer
    in_flight = min(pp, data.micro_num)  # 1F1B: the first stage holds up to pp micro-batches
    logits = head_loss_bytes(cfg.loss, tokens, hidden, vocab // tp, width)
    if pp == 1:
        params, activations = embedding + layers * layer + head, kept + logits
    else:
        params = max(embedding, head) + layers * layer
        activations = max(in_flight * kept, kept + logits)
    params = params / tp
    largest_module = max(embedding, layer, head) / tp
    # LoRA: gradients and optimizer states exist for the adapters only
    trained = sum(param.numel() for param in model.parameters() if param.requires_grad) / max(total, 1)
    return _zero_state(cfg, layout, params, total, largest_module, activations, trained)


def _zero_state(cfg: TrainConfig, layout: ParallelLayout, params: float, total: int, largest_module: float,
                activations: float, trained: float = 1.0) -> MemoryEstimate:
    """Weights, gradients and optimizer states of `params` parameters per rank, sharded over the data ranks as
    DeepSpeed's ZeRO stages do (fp32 master weights and Adam states, 12 bytes a parameter, in every stage):
    - ZeRO-1: weights and gradients in model.dtype whole; bf16 adds DeepSpeed's whole fp32 gradient accumulation
      buffer, other dtypes a 1/dp fp32 gradient shard for the update;
    - ZeRO-2: whole weights; gradients only transiently whole, in the reduce bucket (hybrid_zero_optimizer.
      reduce_bucket_size elements at most), and as a 1/dp fp32 shard;
    - ZeRO-3: 1/dp of the weights plus the largest module gathered whole, gradients as ZeRO-2 but with the whole
      reduce bucket, which DeepSpeed's stage-3 optimizer allocates up front (evods caps it at hidden_size²
      elements: evods.config.reduce_bucket_elements). The model is built under zero.Init: this rank's shards, and one
      module whole in fp32 at a time.
    Offload moves the fp32 shards, their gradients and the Adam states (optimizer) and the weight shards
    (parameters) to host memory. `trained`: the share of the parameters that train (LoRA: the adapters'), which
    alone have gradients and optimizer states."""
    dp, stage, width = layout.zero_ranks, layout.zero_stage, torch.finfo(cfg.model.dtype).bits // 8
    bucket = reduce_bucket_elements(cfg, layout)
    grads = params * trained
    if stage != 3:  # stages 1/2 fill the bucket as gradients arrive: never more than the model
        bucket = min(bucket, grads)
    gradient_shard = grads * 4 / dp
    build = total * 4
    if stage == 1:
        weights = params * width
        gradients = grads * width + (grads * 4 if cfg.model.dtype == torch.bfloat16 else gradient_shard)
    else:
        weights = params * width
        gradients = bucket * width + gradient_shard
        if stage == 3:
            weights = params * width / dp + largest_module * width
            build = total * width / dp + largest_module * 4
    optimizer = grads * ADAM_AND_MASTER_BYTES / dp
    offloaded = (optimizer + gradient_shard if layout.offload_optimizer else 0) + \
        (params * width / dp if layout.offload_param else 0)
    return MemoryEstimate(build=int(build), weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(activations), zero_stage=stage, offloaded=int(offloaded))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int | None:
    """MemAvailable, or less when a cgroup (a container, a slurm job) limits this process."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                      if line.startswith("MemAvailable:")), None)
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                             "memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and available is not None:
            available = min(available, max(cap - used, 0))
    return available


def _ranks_on_this_host() -> int:
    if not dist.is_initialized():
        return 1
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def _free_memory(device_type: str, local_ranks: int) -> tuple[int | None, int | None, str]:
    """(free device bytes, free host bytes, where they were measured) for this rank."""
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        try:
            limit = int(float(override) * GIB)
        except ValueError:
            raise ConfigError(f"{MEMORY_LIMIT_ENV}={override!r} must be a number of GiB") from None
        return limit, limit, f"{MEMORY_LIMIT_ENV}={override}"
    host = host_available_bytes()
    host_share = None if host is None else host // local_ranks
    where = f"host memory available / {local_ranks} ranks on this host"
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[0], host_share, f"free on cuda:{torch.cuda.current_device()}; {where}"
    return host_share, host_share, where


def check_memory(cfg: TrainConfig, model: torch.nn.Module, layout: ParallelLayout, device_type: str) -> MemoryEstimate:
    """Refuse (ConfigError, on every rank alike) a run whose estimate exceeds the free memory; warn when it is close.
    `model`: the whole model built on the meta device.

    On the CPU the model is built and trained in host memory, so the larger of the two counts; on a GPU the fp32
    build happens in host memory and training on the device.
    """
    estimate = estimate_memory(cfg, model, layout)
    device_free, host_free, measured = _free_memory(device_type, _ranks_on_this_host())
    built = "this rank's ZeRO-3 shards" if estimate.zero_stage == 3 else "the whole model in fp32"
    build = f"building {built}: {readable(estimate.build)}"
    training = f"training: {estimate.describe_training(layout.dp)}"
    needs = []  # (needed bytes, free bytes, what is needed)
    if device_type == "cpu" and device_free is not None:
        needs.append((max(estimate.training, estimate.build), device_free, f"{build}; {training}"))
    elif device_free is not None:
        needs.append((estimate.on_device, device_free, training))
    if device_type != "cpu" and host_free is not None:
        host = f"host memory for {build}" + (f"; then {readable(estimate.offloaded)} offloaded" if
                                             estimate.offloaded else "")
        needs.append((max(estimate.build, estimate.offloaded), host_free, host))
    verdict = max(((needed / max(free, 1), needed, free, what, measured) for needed, free, what in needs),
                  default=None)
    verdicts = [verdict]
    if dist.is_initialized():  # every rank decides on the worst rank's numbers, so none goes on to wait for the others
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, verdict)
    ratio, needed, free, what, measured = max((v for v in verdicts if v is not None), default=(0, 0, 0, "", ""))
    if ratio > 1:
        where = cfg.source.path if cfg.source else "the config"
        raise ConfigError(f"{where}: the model does not fit: a rank needs about {readable(needed)} ({what}) but "
                          f"has {readable(free)} ({measured}); use more ranks or parallel.tensor / "
                          f"parallel.pipeline, model.checkpoint=True, a smaller data.micro_bsz, or a bigger machine "
                          f"(or set {MEMORY_LIMIT_ENV} if the measurement is wrong)")
    if ratio > TIGHT:
        logger.warning("memory is tight: a rank needs about %s (%s) of %s (%s); the estimate is rough",
                       readable(needed), what, readable(free), measured)
    return estimate
