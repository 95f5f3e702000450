"""The one schema of a training config: typed sections with InternEvo's defaults (its configs/7B_sft.py and
launch.py), built from the loaded dict.

Each key is a dataclass field whose metadata holds its `Rule` (what the value must be, in words for the error) or
its `section` (a nested dataclass). `_build` walks a section generically: unknown keys fail with the closest known
key, missing required keys and wrong values fail with the key's full name. `_normalise` then applies the fill-ins
and rewrites of InternEvo's `launch.py` (`args_sanity_check`).
"""
import difflib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from evods.data import DataError, Rampup, parse_rampup, parse_skip_batches
from evods.model.attention_heads import HeadSplit
from evods.model.chat_templates import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE
from evods.model.internevo import MODEL_TYPE_CHAT_TEMPLATES, NORM_HEAD_REFUSAL, model_rope
from evods.model.lora import LORA_TARGET_MODULES, LoraSpec
from evods.model.registry import MODEL_INITIALIZER

from .errors import ConfigError
from .loader import ConfigSource, load_config_file

logger = logging.getLogger("evods.config")


@dataclass(frozen=True)
class Rule:
    words: str  # completes "data.micro_num must be ..."
    test: Callable[[Any], bool]
    secret: bool = False  # the value may hold a credential (a webhook token): errors do not repeat it


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(rule: Rule) -> Rule:
    return Rule(f"None or {rule.words}", lambda v: v is None or rule.test(v))


BOOL = Rule("a bool (True or False)", lambda v: isinstance(v, bool))
STR = Rule("a string", lambda v: isinstance(v, str))
INT = Rule("an int", _is_int)
POSITIVE_INT = Rule("a positive int", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("a non-negative int", lambda v: _is_int(v) and v >= 0)
NUMBER = Rule("a number", _is_number)
POSITIVE_NUMBER = Rule("a positive number", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a non-negative number", lambda v: _is_number(v) and v >= 0)
# checkpoint_every and oss_snapshot_freq: a step count, or float("inf") for never
STEP_INTERVAL = Rule("a positive int or float('inf')", lambda v: (_is_int(v) and v > 0) or v == math.inf)
OPTIONAL_STR = _optional(STR)
DICT = Rule("a dict", lambda v: isinstance(v, dict))


def _in_range(low: float, high: float, *, high_open: bool = False) -> Rule:
    bracket = ")" if high_open else "]"
    return Rule(f"a number in [{low}, {high}{bracket}",
                lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high))


def _one_of(*choices: str, note: str = "") -> Rule:
    return Rule(f"one of {', '.join(map(repr, choices))}{note}", lambda v: v in choices)


def key(rule: Rule, default=MISSING, *, coerce: Callable | None = None):
    """A config key. Without a default it is required. `coerce` reshapes an accepted alternative spelling first."""
    return field(default=default, metadata={"rule": rule, "coerce": coerce})


def section(cls, *, optional: bool = False, required: bool = False, coerce: Callable | None = None):
    """A nested dict of keys. `optional`: None is allowed and is the default."""
    if required:
        default = dict(default=MISSING)
    elif optional:
        default = dict(default=None)
    else:
        default = dict(default_factory=cls)
    return field(**default, metadata={"section": cls, "optional": optional, "coerce": coerce})


# ---------------------------------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class TrainDatasetConfig:
    """data.train_dataset: text from a Hugging Face dataset, tokenized on the fly (evods.data.hf_source)."""
    path: str = key(STR)  # a save_to_disk folder, data files (parquet, jsonl, json, txt, csv: file or folder), Hub name
    streaming: bool = key(BOOL, False)  # False: tokenized once, packed and shuffled as a .bin; True: read in order
    text_key: str = key(STR, "text")
    # SentencePiece model, or a Hugging Face tokenizer folder / tokenizer.json; None: tools/V7_sft.model
    tokenizer_path: str | None = key(OPTIONAL_STR, None)
    split: str = key(STR, "train")
    name: str | None = key(OPTIONAL_STR, None)  # the Hub dataset's configuration
    add_bos: bool = key(BOOL, False)
    add_eos: bool = key(BOOL, False)


@dataclass(kw_only=True)
class DataConfig:
    seq_len: int = key(POSITIVE_INT)
    micro_num: int = key(POSITIVE_INT, 1)  # micro-batches per optimizer step (gradient accumulation)
    micro_bsz: int = key(POSITIVE_INT)  # seq_len rows packed into one micro-batch
    # launch.py's derived copy of micro_num; a config that sets it must agree (InternEvo asserts it without pipelines)
    gradient_accumulation: int | None = key(_optional(POSITIVE_INT), None)
    # Always seq_len * micro_bsz; a user value is ignored with a warning, as InternEvo does.
    packed_length: int | None = key(_optional(POSITIVE_INT), None)
    valid_micro_num: int | None = key(_optional(POSITIVE_INT), None)  # None -> micro_num
    valid_every: int = key(NON_NEGATIVE_INT, 0)  # 0: no validation
    total_steps: int = key(POSITIVE_INT)
    # InternEvo requires the next three; evods gives the values every shipped config uses.
    pack_sample_into_one: bool = key(BOOL, False)
    skip_batches: str = key(STR, "")  # parsed into skip_ranges
    rampup_batch_size: str = key(STR, "")  # parsed into rampup
    min_length: int = key(NON_NEGATIVE_INT, 0)
    train_folder: str | None = key(OPTIONAL_STR, None)  # None: random data
    train_dataset: TrainDatasetConfig | None = section(TrainDatasetConfig, optional=True)  # instead of train_folder
    valid_folder: str | None = key(OPTIONAL_STR, None)
    empty_cache_and_diag_interval: int = key(POSITIVE_INT, 50)
    diag_outlier_ratio: float = key(NUMBER, 1.1)  # clamped to >= 1
    min_length_dict: dict | None = key(_optional(DICT), None)
    # InternEvo [IE] additions
    type: str = key(_one_of("tokenized", note=" (for InternEvo's type='streaming', set data.train_dataset=dict("
                                              "path=..., streaming=True) instead)"), "tokenized")
    use_packed_dataset: bool = key(BOOL, True)
    fixed_random_dataset_seqlen: bool = key(BOOL, False)
    num_worker: int = key(NON_NEGATIVE_INT, 4)
    seed: int = key(INT, 1024)
    # Parsed once, from the two keys above (evods.data.parse_skip_batches, parse_rampup), and handed to the data
    # pipeline as they are.
    skip_ranges: tuple[tuple[int, int], ...] = field(default=(), init=False)
    rampup: Rampup | None = field(default=None, init=False)



CKPT_CONTENT = {"model", "sampler", "optimizer", "scheduler", "all"}
# load_ckpt_info's ckpt_type, checked when the config loads (before any process group starts): "evods"; a Hugging
# Face folder (evods.checkpoint.formats.hf_start: "hf_llama" and "hf_model", InternEvo's LOAD_FUNC_DICT names, and "hf",
# its newer one); InternEvo's native layouts (evods.checkpoint.resume.plan.NATIVE_LAYOUTS)
CKPT_TYPES = ("evods", "hf", "hf_llama", "hf_model", "internlm", "internevo", "internlm2_test", "llama")
# The snapshots of a run live in this folder of its save_ckpt_folder, where auto_resume looks for them beside the
# normal checkpoints (evods.checkpoint.layout); ckpt.snapshot_ckpt_folder can only name that folder.
SNAPSHOT_FOLDER = "snapshot"


def _as_tuple(value):
    """content=("model") is a common slip for ("model",); lists are fine too."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


@dataclass(kw_only=True)
class LoadCkptInfo:
    path: str | None = key(OPTIONAL_STR)  # None: start from scratch, as InternEvo (its demo.py does this)
    content: tuple = key(Rule('a non-empty tuple of "model", "sampler", "optimizer", "scheduler" or "all"',
                              lambda v: isinstance(v, tuple) and bool(v) and set(v) <= CKPT_CONTENT),
                         ("model",), coerce=_as_tuple)
    ckpt_type: str = key(_one_of(*CKPT_TYPES), "internlm")


@dataclass(kw_only=True)
class CkptConfig:
    enable_save_ckpt: bool = key(BOOL, True)
    save_ckpt_folder: str | None = key(OPTIONAL_STR, None)
    load_ckpt_info: LoadCkptInfo | None = section(LoadCkptInfo, optional=True)
    auto_resume: bool = key(BOOL, True)  # overrides load_ckpt_info when a checkpoint exists under save_ckpt_folder
    # auto_resume finds the newest checkpoint damaged: load the previous complete one (True) or stop with an error
    auto_resume_fallback: bool = key(BOOL, True)
    checkpoint_every: float = key(STEP_INTERVAL, math.inf)
    async_upload: bool = key(BOOL, False)  # only for boto3:/s3: folders
    async_upload_tmp_folder: str | None = key(OPTIONAL_STR, "/dev/shm/internlm_tmp_ckpt/")
    oss_snapshot_freq: float = key(STEP_INTERVAL, math.inf)
    stop_file_path: str | None = key(OPTIONAL_STR, None)
    snapshot_ckpt_folder: str | None = key(OPTIONAL_STR, None)  # {save_ckpt_folder}/snapshot, the only choice
    keep_last_ckpts: int = key(NON_NEGATIVE_INT, 0)  # keep only the newest k normal checkpoints (0: keep all)
    # InternEvo converts each saved checkpoint to HF as well; evods leaves it to tools/convert2hf.py (a warning)
    enable_internevo2hf_ckpt: bool = key(BOOL, False)
    # legacy keys, used when load_ckpt_info is absent
    load_ckpt_folder: str | None = key(OPTIONAL_STR, None)
    load_model_only_folder: str | None = key(OPTIONAL_STR, None)
    load_optimizer: bool = key(BOOL, True)
    load_given_ckpt: bool = key(BOOL, False)


def _sized(value):
    """InternEvo accepts `pipeline=2` for `pipeline=dict(size=2)`, and the same for `zero1`, `tensor` and `weight`."""
    return dict(size=value) if _is_int(value) else value


@dataclass(kw_only=True)
class Zero1Config:
    # <=0: shard over the whole data-parallel group; 1: no sharding; >1: a subset (evods always uses the whole group)
    size: int = key(INT, -1)
    fsdp: bool = key(BOOL, False)  # InternEvo's FSDP (parameters sharded too): DeepSpeed ZeRO-3 in evods


ZERO_STAGES = (1, 2, 3)


@dataclass(kw_only=True)
class ZeroConfig:
    """evods' key for DeepSpeed's ZeRO: which stage, and what it keeps in host memory. `_resolve_zero` fills in the
    stage and refuses what DeepSpeed cannot run."""

    # 1: optimizer states sharded; 2: gradients too; 3: parameters too. None: 3 with zero1.fsdp=True, else 1.
    stage: int | None = key(_optional(Rule("1, 2 or 3", lambda v: _is_int(v) and v in ZERO_STAGES)), None)
    offload_optimizer: bool = key(BOOL, False)  # fp32 master weights, gradients and Adam in host memory (stage 2/3)
    offload_param: bool = key(BOOL, False)  # the model-dtype parameter shards in host memory (stage 3)


@dataclass(kw_only=True)
class PipelineConfig:
    size: int = key(POSITIVE_INT, 1)
    interleaved_overlap: bool = key(BOOL, False)  # only for the interleaved schedule (num_chunks > 1), refused
    # InternEvo's schedules: 1f1b is what DeepSpeed's pipeline engine runs; the zero-bubble ones are refused
    mode: str = key(_one_of("1f1b", "zbh1", "zbv"), "1f1b")


TENSOR_MODES = ("mtp", "msp", "fsp", "isp")


@dataclass(kw_only=True)
class TensorConfig:
    size: int = key(POSITIVE_INT, 1)
    # mtp: Megatron tensor parallelism; msp: with sequence parallelism; isp: Ulysses sequence parallelism of degree
    # size (no weight split; evods.parallel.ulysses); fsp: refused (_normalise_tensor_mode)
    mode: str = key(_one_of(*TENSOR_MODES), "mtp", coerce=lambda v: "mtp" if v is None else v)


@dataclass(kw_only=True)
class WeightConfig:
    size: int = key(POSITIVE_INT, 1)  # InternEvo's weight parallelism (with isp): refused above 1
    overlap: bool = key(BOOL, False)  # the next keys tune weight parallelism only
    memory_pool: bool = key(BOOL, False)
    launch_allgather_before: str = key(_one_of("wqkv", "attn", "wo", "w1"), "wo")
    forward_overlap_per: str = key(_one_of("module", "layer"), "layer")


@dataclass(kw_only=True)
class Sequence2DConfig:
    """InternEvo's 2D sequence parallelism (head parallelism x context parallelism, with isp): runs with isp as head
    parallelism alone (context_size=1); context parallelism is refused."""
    enable: bool = key(BOOL, False)
    head_size: int = key(POSITIVE_INT, 1)
    context_size: int = key(POSITIVE_INT, 1)
    window_size: int = key(POSITIVE_INT, 1)
    device_placement_strategy: dict | None = key(_optional(DICT), None)


@dataclass(kw_only=True)
class ParallelConfig:
    zero1: Zero1Config = section(Zero1Config, coerce=_sized)
    zero: ZeroConfig = section(ZeroConfig)
    pipeline: PipelineConfig = section(PipelineConfig, coerce=_sized)
    tensor: TensorConfig = section(TensorConfig, coerce=_sized)
    weight: WeightConfig = section(WeightConfig, coerce=_sized)
    sequence_parallel: bool = key(BOOL, False)
    sequence_2D: Sequence2DConfig = section(Sequence2DConfig)  # noqa: N815 (InternEvo's key)


@dataclass(kw_only=True)
class Fp16ScaleConfig:
    initial_scale: float = key(POSITIVE_NUMBER, 2**16)
    min_scale: float = key(POSITIVE_NUMBER, 1)
    growth_interval: int = key(POSITIVE_INT, 1000)


@dataclass(kw_only=True)
class GradScalerConfig:
    fp16: Fp16ScaleConfig = section(Fp16ScaleConfig)
    growth_factor: float = key(POSITIVE_NUMBER, 2)
    backoff_factor: float = key(_in_range(0, 1, high_open=True), 0.5)
    max_scale: float = key(POSITIVE_NUMBER, 2**24)
    hysteresis: int = key(POSITIVE_INT, 2)


@dataclass(kw_only=True)
class HybridZeroConfig:
    overlap_sync_grad: bool = key(BOOL, False)
    overlap_sync_param: bool = key(BOOL, False)
    reduce_bucket_size: int = key(POSITIVE_INT, 512 * 1024 * 1024)
    clip_grad_norm: float = key(NON_NEGATIVE_NUMBER, 0.0)  # 0: no clipping
    zero_overlap_communication: bool | None = key(_optional(BOOL), None)  # legacy name of overlap_sync_grad


@dataclass(kw_only=True)
class LossConfig:
    label_smoothing: float = key(_in_range(0, 1, high_open=True), 0.0)
    moe_loss_coeff: float = key(NON_NEGATIVE_NUMBER, 1.0)
    # InternEvo's cross-entropy implementations, which all compute the same loss; evods chooses with `kernel`
    op_type: str = key(_one_of("torch_naive", "apex_naive", "py_naive", "flash_vocab_parallel", "py_vocab_parallel"),
                       "py_vocab_parallel")
    # evods: how the output head and its cross entropy run (evods.training.loss_kernels). "auto": Liger's
    # fused kernel on CUDA where installed and the vocabulary is not split, else "chunked"; "full" holds the whole
    # [tokens, vocab] logits, as InternEvo does.
    kernel: str = key(_one_of("auto", "chunked", "liger", "full"), "auto")
    chunk_tokens: int | None = key(_optional(POSITIVE_INT), None)  # None: from the vocab and hidden size


def _peft_spelling(value):
    """lora=dict(alpha=..., dropout=...): the short names, as peft's LoraConfig's lora_alpha and lora_dropout."""
    if not isinstance(value, dict):
        return value
    renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return {renamed[name] if name in renamed and renamed[name] not in value else name: item
            for name, item in value.items()}


TARGET_MODULES = Rule(f"a list of the names {', '.join(LORA_TARGET_MODULES)} (the projections of evods' models)",
                      lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and set(v) <= set(LORA_TARGET_MODULES))


@dataclass(kw_only=True)
class LoraConfig:
    """evods' own `lora` section: train LoRA adapters on a frozen base (evods.model.lora); names as peft's
    LoraConfig."""
    r: int = key(POSITIVE_INT, LoraSpec.r)
    lora_alpha: float = key(POSITIVE_NUMBER, LoraSpec.lora_alpha)
    lora_dropout: float = key(_in_range(0, 1, high_open=True), LoraSpec.lora_dropout)
    target_modules: list | tuple = key(TARGET_MODULES, LORA_TARGET_MODULES)
    use_rslora: bool = key(BOOL, LoraSpec.use_rslora)
    init_lora_weights: bool = key(BOOL, LoraSpec.init_lora_weights)  # False: B random too (peft's, for tests)
    load_in_4bit: bool = key(BOOL, False)  # QLoRA's 4-bit base (transformers' BitsAndBytesConfig name)

    def spec(self) -> LoraSpec:
        return LoraSpec(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                        target_modules=tuple(self.target_modules), use_rslora=self.use_rslora,
                        init_lora_weights=self.init_lora_weights)


@dataclass(kw_only=True)
class AdamConfig:
    lr: float = key(POSITIVE_NUMBER, 1e-4)
    adam_beta1: float = key(_in_range(0, 1, high_open=True), 0.9)
    adam_beta2: float = key(_in_range(0, 1, high_open=True), 0.95)
    adam_beta2_c: float = key(NUMBER, 0)
    adam_eps: float = key(POSITIVE_NUMBER, 1e-8)
    weight_decay: float = key(NON_NEGATIVE_NUMBER, 0.01)


@dataclass(kw_only=True)
class LrSchedulerConfig:
    total_steps: int | None = key(_optional(POSITIVE_INT), None)  # None -> data.total_steps
    init_steps: int = key(NON_NEGATIVE_INT, 0)  # steps at lr 0 before the warmup
    warmup_ratio: float = key(_in_range(0, 1), 0.01)
    eta_min: float = key(NON_NEGATIVE_NUMBER, 1e-5)
    last_epoch: int = key(INT, -1)

    @property
    def warmup_steps(self) -> int:
        return int(self.total_steps * self.warmup_ratio)


@dataclass(kw_only=True)
class Beta2SchedulerConfig:
    init_beta2: float | None = key(_optional(_in_range(0, 1, high_open=True)), None)  # None -> adam.adam_beta2
    c: float | None = key(_optional(NUMBER), None)  # None -> adam.adam_beta2_c; <=0: constant beta2
    cur_iter: int = key(INT, -1)


HTTP_URL = Rule("None or an http:// or https:// URL",
                lambda v: v is None or (isinstance(v, str) and v.startswith(("http://", "https://"))), secret=True)


@dataclass(kw_only=True)
class AlertConfig:
    enable_feishu_alert: bool = key(BOOL, False)
    feishu_alert_address: str | None = key(HTTP_URL, None)  # the webhook the alerts go to
    light_monitor_address: str | None = key(HTTP_URL, None)  # per-step metrics heartbeats go here
    alert_file_path: str | None = key(OPTIONAL_STR, None)
    # evods additions
    webhook_format: str = key(_one_of("feishu", "slack"), "feishu")  # slack: {"text": ...} bodies
    loss_spike_limit: float = key(POSITIVE_NUMBER, 1.5)  # alert when loss > limit × the previous step's loss
    stuck_timeout: float = key(POSITIVE_NUMBER, 1800)  # seconds without a finished step before a "stuck" alert


@dataclass(kw_only=True)
class TensorboardMonitorConfig:
    queue_max_length: int | None = key(_optional(POSITIVE_INT), None)


@dataclass(kw_only=True)
class MonitorConfig:
    alert: AlertConfig = section(AlertConfig)
    tensorboard: TensorboardMonitorConfig = section(TensorboardMonitorConfig)
    log_every: int = key(POSITIVE_INT, 50)  # optimizer steps between progress (ETA) lines; evods addition


DTYPES = {  # config string -> (torch dtype, use TF32 matmuls)
    "torch.float16": (torch.float16, False),
    "torch.half": (torch.float16, False),
    "torch.bfloat16": (torch.bfloat16, False),
    "torch.float32": (torch.float32, False),
    "torch.tf32": (torch.float32, True),
}
DTYPE = Rule(f"one of {', '.join(map(repr, DTYPES))}",
             lambda v: v in DTYPES or v in (torch.float16, torch.bfloat16, torch.float32))


@dataclass(kw_only=True)
class ModelConfig:
    """The `model` keys evods itself reads. Every key, these and any other, goes to the model builder, which
    rejects the ones it does not know: see `TrainConfig.model_dict`."""

    num_attention_heads: int = key(POSITIVE_INT)
    # key/value heads of grouped-query attention, each shared by num_attention_heads / this query heads; None: as many
    # as query heads (multi-head attention)
    num_kv_attention_heads: int | None = key(_optional(POSITIVE_INT), None)
    hidden_size: int = key(POSITIVE_INT)
    num_layers: int = key(POSITIVE_INT)
    vocab_size: int = key(POSITIVE_INT)
    mlp_ratio: float = key(POSITIVE_NUMBER)
    # fraction of layers that recompute activations; True -> 1.0, False -> 0.0
    checkpoint: float = key(Rule("True, False or a number in [0, 1]",
                                 lambda v: isinstance(v, bool) or (_is_number(v) and 0 <= v <= 1)), 0.0,
                            coerce=lambda v: float(v) if isinstance(v, bool) else v)
    dtype: torch.dtype = key(DTYPE, None)  # missing -> fp16 with a warning, as InternEvo
    tf32: bool = field(default=False, init=False)  # from dtype="torch.tf32": fp32 with TF32 matmuls
    use_flash_attn: bool = key(BOOL, True)
    num_chunks: int = key(POSITIVE_INT, 1)  # >1 asks for the interleaved pipeline, which DeepSpeed lacks
    embed_split_hidden: bool = key(BOOL, False)
    embed_grad_scale: float = key(NUMBER, 1)
    parallel_output: bool = key(BOOL, True)
    apply_post_layer_norm: bool = key(BOOL, False)
    norm_type: str = key(STR, "rmsnorm")
    layer_norm_epsilon: float = key(POSITIVE_NUMBER, 1e-5)
    norm_head: bool = key(BOOL, False)  # InternEvo's L2-normalised output head: refused (NORM_HEAD_REFUSAL)
    # evods' own: the chat format of the model's fine-tuning data (tools/chat_tokenizer.py --template), which its
    # checkpoints carry into exports and model.chat (evods.model.chat_templates)
    chat_template: str = key(_one_of(*CHAT_TEMPLATES), DEFAULT_CHAT_TEMPLATE)
    # evods' own, in transformers' spelling (Llama-3 family): the RoPE scaling (evods.model.internevo.model_rope) and an
    # output head that is the input embedding
    rope_scaling: dict | None = key(_optional(DICT), None)
    tie_word_embeddings: bool = key(BOOL, False)

    EXTRA_KEYS_ALLOWED = True  # other keys belong to the model builder


@dataclass(kw_only=True)
class TrainConfig:
    JOB_NAME: str = key(STR, "AnonymousJob")
    model_type: str = key(STR, "INTERNLM")  # a builder registered in evods.model.registry; checked by _check_model_type
    enable_tb: bool = key(BOOL, True)
    tensorboard_folder: str | None = key(OPTIONAL_STR, None)  # None -> env tensorboard_folder
    resume_tb_folder: str | None = key(OPTIONAL_STR, None)  # None -> env resume_tb_folder
    alert_address: str | None = key(HTTP_URL, None)  # legacy name of monitor.alert.feishu_alert_address
    cudnn_deterministic: bool = key(BOOL, False)
    cudnn_benchmark: bool = key(BOOL, False)
    use_fp32_norm: bool = key(BOOL, False)  # fp32 norm weights in a 16-bit model: refused, DeepSpeed casts them all
    metric_dtype: str | None = key(OPTIONAL_STR, None)  # "fp32": evods' metrics are always fp32 or wider
    moe: dict | None = key(_optional(DICT), None)  # expert settings of MoE models, which evods does not build
    # settings of InternEvo's own generation script; evods' tools/generate.py and tools/chat.py take them as options
    generation: dict | None = key(_optional(DICT), None)
    # InternEvo's recompute of selected ops (with their offload) instead of whole layers: evods recomputes the layers
    # model.checkpoint names (a warning when asked)
    selective_checkpoint: bool = key(BOOL, False)
    selective_checkpoint_offload: bool = key(BOOL, False)

    data: DataConfig = section(DataConfig, required=True)
    model: ModelConfig = section(ModelConfig, required=True)
    parallel: ParallelConfig = section(ParallelConfig)
    ckpt: CkptConfig = section(CkptConfig)
    grad_scaler: GradScalerConfig = section(GradScalerConfig)
    hybrid_zero_optimizer: HybridZeroConfig = section(HybridZeroConfig)
    loss: LossConfig = section(LossConfig)
    adam: AdamConfig = section(AdamConfig)
    lr_scheduler: LrSchedulerConfig = section(LrSchedulerConfig)
    beta2_scheduler: Beta2SchedulerConfig = section(Beta2SchedulerConfig)
    monitor: MonitorConfig = section(MonitorConfig)
    lora: LoraConfig | None = section(LoraConfig, optional=True, coerce=_peft_spelling)  # None: full fine-tuning

    # Filled from the file, not keys
    constants: dict = field(default_factory=dict)  # the UPPERCASE user variables (SEQ_LEN, MODEL_ONLY_FOLDER, ...)
    source: ConfigSource | None = None  # the file's path and text (checkpoints store the text: config_file.pt)
    raw_model: dict = field(default_factory=dict)  # the `model` dict as written

    @property
    def model_dict(self) -> dict:
        """The kwargs for the model builder (`get_module(model_type)(**cfg.model_dict)`): the `model` dict as written,
        with the values launch.py normalises (checkpoint as float, dtype as torch dtype, use_flash_attn after the
        device check, num_chunks) filled in."""
        typed = self.model
        return {**self.raw_model, "checkpoint": typed.checkpoint, "dtype": typed.dtype,
                "use_flash_attn": typed.use_flash_attn, "num_chunks": typed.num_chunks}


# ---------------------------------------------------------------------------------------------------- building


def _keys_of(cls) -> dict:
    return {f.name: f for f in fields(cls) if "rule" in f.metadata or "section" in f.metadata}


def _unknown_key_error(source: ConfigSource, where: str, name: str, known, note: str = "") -> ConfigError:
    full = f"{where}.{name}" if where else name
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {(where + '.') if where else ''}{close[0]}?" if close else \
        f"known keys: {', '.join(sorted(known))}"
    return source.error(full, f"unknown key {full!r}; {hint}{note}")


def _build(cls, raw: dict, where: str, source: ConfigSource):
    known = _keys_of(cls)
    if not getattr(cls, "EXTRA_KEYS_ALLOWED", False):
        for name in raw:
            if name not in known:
                raise _unknown_key_error(source, where, name, known)
    values = {}
    for name, spec in known.items():
        full = f"{where}.{name}" if where else name
        if name not in raw:
            if spec.default is MISSING and spec.default_factory is MISSING:
                container = f"to {where} = dict(...)" if where else "at the top level"
                raise source.error(where, f"{full} is required: add {name}=... {container}")
            continue
        value = raw[name]
        if spec.metadata["coerce"] is not None:
            value = spec.metadata["coerce"](value)
        nested = spec.metadata.get("section")
        if nested is not None:
            if value is None and spec.metadata["optional"]:
                values[name] = None
                continue
            if not isinstance(value, dict):
                raise source.error(full, f"{full} must be a dict(...), got {value!r}")
            values[name] = _build(nested, value, full, source)
        elif not spec.metadata["rule"].test(value):
            rule = spec.metadata["rule"]
            raise source.error(full, f"{full} must be {rule.words}" + ("" if rule.secret else f", got {value!r}"))
        else:
            values[name] = value
    return cls(**values)


def parse_config(raw: dict, source: ConfigSource) -> TrainConfig:
    """Validate the loaded names against the schema, fill in the defaults and normalise as InternEvo's launch.py."""
    _check_model_type(raw.get("model_type", "INTERNLM"), source)
    known = _keys_of(TrainConfig)
    constants = {name: value for name, value in raw.items() if name.isupper() and name not in known}
    keys = {name: value for name, value in raw.items() if name not in constants}
    for name in keys:
        if name not in known:
            raise _unknown_key_error(source, "", name, known,
                                     note=" (UPPERCASE names are free user variables; prefix helpers with '_')")
    cfg = _build(TrainConfig, keys, "", source)
    cfg.constants, cfg.source = constants, source
    cfg.raw_model = dict(keys["model"])
    if "chat_template" not in cfg.raw_model:  # the model type's own, as its builder gives it
        cfg.model.chat_template = MODEL_TYPE_CHAT_TEMPLATES.get(cfg.model_type, DEFAULT_CHAT_TEMPLATE)
    _normalise(cfg, source)
    return cfg


# InternEvo's model types (its ModelType); evods builds the InternLM family (evods/model/internevo.py)
INTERNEVO_MODEL_TYPES = ("INTERNLM", "INTERNLM2", "INTERNLM2_PUBLIC", "INTERNLM3", "LLAMA2", "INTERNLM_MoE", "QWEN2",
                         "BAICHUAN2", "GEMMA", "MIXTRALMOE", "QWEN2MOE", "LLAVA")


def _check_model_type(model_type, source: ConfigSource) -> None:
    """Refuse a model evods cannot build now, not after the process groups exist (InternEvo finds out in train.py).
    Builders registered with evods.model.registry.MODEL_INITIALIZER before loading count."""
    if not isinstance(model_type, str) or model_type in MODEL_INITIALIZER:
        return  # a value of the wrong type is reported by the schema, with the others
    not_ported = [name for name in INTERNEVO_MODEL_TYPES if name not in MODEL_INITIALIZER]
    raise source.error("model_type", f"model_type={model_type!r} is not a model evods builds: it builds "
                                     f"{', '.join(map(repr, MODEL_INITIALIZER.names()))} (InternEvo's "
                                     f"{', '.join(map(repr, not_ported))} are not ported); use one it builds, with "
                                     f"an InternLM-family model dict")


def load_config(path: str | Path) -> TrainConfig:
    """Load, validate and normalise an InternEvo-style Python config file. Raises ConfigError."""
    raw, source = load_config_file(path)
    return parse_config(raw, source)


# ---------------------------------------------------------------------------------------------------- launch.py


def _normalise(cfg: TrainConfig, source: ConfigSource) -> None:
    _normalise_data(cfg.data, source)
    _normalise_model(cfg.model)
    if cfg.model.norm_head:
        raise source.error("model.norm_head", f"model.{NORM_HEAD_REFUSAL}")
    _check_parallel(cfg.parallel, source)
    _check_attention_heads(cfg.model, cfg.parallel.tensor.size, source)
    _check_llama_keys(cfg, source)
    if cfg.parallel.zero.stage == 3 and cfg.loss.kernel == "full":
        raise source.error("loss.kernel", "loss.kernel='full' keeps lm_head's weight for the backward, which ZeRO-3 "
                                          "shards again after the loss (evods gathers it only for the loss); use "
                                          "'chunked' (the same loss and gradients) or 'auto'")
    if cfg.use_fp32_norm and cfg.model.dtype != torch.float32:
        raise source.error("use_fp32_norm", "use_fp32_norm=True (fp32 norm weights in a 16-bit model) is not "
                                            "supported by evods: DeepSpeed casts every parameter to model.dtype "
                                            "(norms still compute in fp32); set use_fp32_norm=False")
    _normalise_ckpt(cfg.ckpt, source)
    _normalise_optimizer(cfg, source)
    if cfg.lora is not None:
        _check_lora(cfg, source)
    if cfg.tensorboard_folder is None:
        cfg.tensorboard_folder = os.environ.get("tensorboard_folder")
    if cfg.resume_tb_folder is None:
        cfg.resume_tb_folder = os.environ.get("resume_tb_folder")
    _warn_unapplied(cfg)
    _normalise_alert(cfg)


def _check_lora(cfg: TrainConfig, source: ConfigSource) -> None:
    if cfg.lora.load_in_4bit:
        raise source.error("lora.load_in_4bit", "lora.load_in_4bit=True (QLoRA: a 4-bit base) is not run by evods: "
                                                "its 4-bit layers need bitsandbytes and CUDA and do not split over "
                                                "tensor ranks; set load_in_4bit=False (a 16-bit frozen base)")
    if cfg.parallel.zero.stage == 3:
        raise source.error("parallel.zero.stage", "lora=dict(...) with ZeRO-3 is not supported: the adapters are "
                                                  "added to a whole base, which ZeRO-3 never holds; use ZeRO stage 1"
                                                  " or 2 (the optimizer states are the adapters' only)")
    if cfg.parallel.tensor.mode == "isp":
        raise source.error("parallel.tensor.mode", 'lora=dict(...) with parallel.tensor.mode="isp" is not run by evods;'
                                                   ' train adapters with mode="mtp" (or tensor size 1)')


def _normalise_alert(cfg: TrainConfig) -> None:
    alert = cfg.monitor.alert
    if alert.feishu_alert_address is None:
        alert.feishu_alert_address = cfg.alert_address
    if alert.alert_file_path:
        logger.info("monitor.alert.alert_file_path is not needed by evods: the first failing rank's exception is "
                    "alerted once, through the process group's store")
    if alert.enable_feishu_alert and alert.feishu_alert_address is None:
        logger.warning("monitor.alert.enable_feishu_alert=True but feishu_alert_address is None: no alerts will be "
                       "sent; set feishu_alert_address to the bot's webhook URL")


def _warn_unapplied(cfg: TrainConfig) -> None:
    """Keys evods accepts, so that InternEvo configs load, but does not act on: say so when they ask for something."""
    unapplied = [
        (not cfg.data.use_packed_dataset, "data.use_packed_dataset=False", "evods always trains on packed rows"),
        (cfg.data.fixed_random_dataset_seqlen, "data.fixed_random_dataset_seqlen=True",
         "the random dataset keeps InternEvo's original sample lengths"),
        (cfg.data.seed != 1024, f"data.seed={cfg.data.seed}", "the data order uses InternEvo's fixed seed 1024"),
        (cfg.model.embed_grad_scale != 1, f"model.embed_grad_scale={cfg.model.embed_grad_scale}",
         "embedding gradients are not rescaled"),
        (cfg.model.apply_post_layer_norm, "model.apply_post_layer_norm=True", "InternLM is pre-norm (InternEvo "
         "ignores it too)"),
        (cfg.resume_tb_folder is not None, f"resume_tb_folder={cfg.resume_tb_folder!r}",
         "TensorBoard scalars go to this run's folder"),
        (cfg.metric_dtype not in (None, "fp32"), f"metric_dtype={cfg.metric_dtype!r}",
         "metrics are always computed in fp32"),
        (cfg.moe is not None, "moe=dict(...)", f"model_type {cfg.model_type!r} has no experts"),
        (cfg.selective_checkpoint, "selective_checkpoint=True", "activation recompute covers the whole layers that "
         "model.checkpoint selects"),
        (cfg.selective_checkpoint_offload, "selective_checkpoint_offload=True", "no activations are offloaded"),
        (cfg.ckpt.enable_internevo2hf_ckpt, "ckpt.enable_internevo2hf_ckpt=True", "checkpoints are saved in evods' "
         "format only; convert one with tools/convert2hf.py"),
    ]
    for asked, setting, what_happens in unapplied:
        if asked:
            logger.warning("%s is not applied by evods: %s.", setting, what_happens)
    zero = cfg.hybrid_zero_optimizer
    if zero.overlap_sync_grad or zero.overlap_sync_param:
        logger.info("hybrid_zero_optimizer.overlap_sync_*: DeepSpeed's ZeRO-1 schedules its own communication "
                    "(set zero_optimization.overlap_comm in a --ds_config file to change it).")


def _normalise_data(data: DataConfig, source: ConfigSource) -> None:
    if data.train_folder and data.train_dataset:
        raise source.error("data.train_dataset", "data.train_folder and data.train_dataset are both set: train on "
                                                 "bin/meta files or on a Hugging Face dataset, keep one")
    if data.gradient_accumulation not in (None, data.micro_num):
        raise source.error("data.gradient_accumulation",
                           f"data.gradient_accumulation={data.gradient_accumulation} must equal data.micro_num="
                           f"{data.micro_num}: a step accumulates exactly its micro_num micro-batches; remove it")
    data.gradient_accumulation = data.micro_num
    packed_length = data.seq_len * data.micro_bsz
    if data.packed_length not in (None, packed_length):
        logger.warning("data.packed_length=%s is ignored: it is always seq_len * micro_bsz = %d",
                       data.packed_length, packed_length)
    data.packed_length = packed_length
    if data.valid_micro_num is None:
        data.valid_micro_num = data.micro_num
    data.skip_ranges = _parsed(source, "data.skip_batches", 'a string of inclusive batch ranges like "100-200,350" '
                               '(or "")', lambda: parse_skip_batches(data.skip_batches), data.skip_batches)
    data.rampup = _parsed(source, "data.rampup_batch_size", 'a string "start increment every" like "1 1 100" (or "")',
                          lambda: parse_rampup(data.rampup_batch_size, data.micro_num), data.rampup_batch_size)
    data.diag_outlier_ratio = max(data.diag_outlier_ratio, 1.0)


def _parsed(source: ConfigSource, key: str, words: str, parse: Callable[[], Any], value):
    """`parse()`, with its DataError as the ConfigError of `key` (file and line)."""
    try:
        return parse()
    except DataError as error:
        raise source.error(key, f"{key} must be {words}, got {value!r}: {error}") from None


def _normalise_model(model: ModelConfig) -> None:
    if model.dtype is None:
        logger.warning('model.dtype is not set: using torch.float16, as InternEvo does. Set dtype="torch.bfloat16" '
                       'or another to silence this.')
        model.dtype = "torch.float16"
    if isinstance(model.dtype, str):
        model.dtype, model.tf32 = DTYPES[model.dtype]


def _check_parallel(parallel: ParallelConfig, source: ConfigSource) -> None:
    """InternEvo's parallel modes: those evods does not run are refused with what to write instead."""
    _normalise_tensor_mode(parallel, source)
    if parallel.pipeline.mode != "1f1b":
        raise source.error("parallel.pipeline.mode", f"parallel.pipeline.mode={parallel.pipeline.mode!r} (InternEvo's "
                                                     "zero-bubble schedule) is not run by evods: DeepSpeed's pipeline "
                                                     'engine runs 1F1B; set mode="1f1b"')
    if parallel.weight.size > 1:
        raise source.error("parallel.weight.size", f"parallel.weight.size={parallel.weight.size} asks for InternEvo's "
                                                   "weight parallelism (an isp companion), which evods does not run; "
                                                   "set weight=dict(size=1)")
    if parallel.tensor.mode == "isp":
        _check_isp(parallel, source)
    elif parallel.sequence_2D.enable:
        raise source.error("parallel.sequence_2D", "parallel.sequence_2D.enable=True (InternEvo's head x context "
                                                   "sequence parallelism, an isp companion) is not run by evods; set "
                                                   "enable=False")
    _resolve_zero(parallel, source)
    if parallel.tensor.mode == "isp" and parallel.zero.stage == 3:
        raise source.error("parallel.zero.stage", 'ZeRO-3 with parallel.tensor.mode="isp" is not run by evods; use '
                                                  "ZeRO stage 1 or 2 with isp")


def _check_isp(parallel: ParallelConfig, source: ConfigSource) -> None:
    """What evods runs of InternEvo's isp: Ulysses head parallelism of degree tensor.size (sequence_2D's head_size,
    when given), without context parallelism (ring attention)."""
    size, two_d = parallel.tensor.size, parallel.sequence_2D
    if two_d.enable and two_d.context_size > 1:
        raise source.error("parallel.sequence_2D", f"parallel.sequence_2D.context_size={two_d.context_size} "
                                                   "(InternEvo's ring-attention context parallelism) is not run by "
                                                   "evods; set context_size=1 (isp splits the heads only)")
    if two_d.enable and two_d.head_size != size:
        raise source.error("parallel.sequence_2D", f"parallel.sequence_2D.head_size={two_d.head_size} must equal "
                                                   f"parallel.tensor size {size}: with context_size=1 every isp rank "
                                                   f"is a head rank")


def _check_llama_keys(cfg: TrainConfig, source: ConfigSource) -> None:
    """The RoPE scaling is one evods computes; a tied output head shares the embedding's vocabulary rows under tensor
    parallelism, and whole parameters (no ZeRO-3 partitions)."""
    try:
        model_rope(cfg.raw_model)
    except ValueError as error:
        raise source.error("model.rope_scaling", "model." + str(error).removeprefix("model config: ")) from None
    parallel = cfg.parallel
    if cfg.model.tie_word_embeddings and parallel.zero.stage == 3:
        raise source.error("model.tie_word_embeddings",
                           "model.tie_word_embeddings=True is not supported with ZeRO stage 3; evods ties the output "
                           "head with ZeRO stage 1 or 2")
    if cfg.model.tie_word_embeddings and parallel.tensor.size > 1 and cfg.model.embed_split_hidden:
        raise source.error("model.embed_split_hidden",
                           f"model.tie_word_embeddings=True at parallel.tensor size {parallel.tensor.size} needs "
                           "model.embed_split_hidden=False: the tied embedding is split by vocabulary rows, as the "
                           "output head is")


def _check_attention_heads(model: ModelConfig, tp: int, source: ConfigSource) -> None:
    """The query heads must be a multiple of the KV heads, and tensor parallelism must split both
    (evods.model.HeadSplit: whole KV heads per rank, or KV heads shared by several ranks)."""
    heads, kv_heads = model.num_attention_heads, model.num_kv_attention_heads or model.num_attention_heads
    if heads % kv_heads:
        raise source.error("model.num_kv_attention_heads",
                           f"model.num_attention_heads={heads} is not a multiple of model.num_kv_attention_heads="
                           f"{kv_heads}: each KV head serves an equal group of query heads")
    problem = HeadSplit.problem(heads, kv_heads, tp)
    if problem:
        raise source.error("parallel.tensor", f"parallel.tensor size {tp} does not split model.num_attention_heads="
                                              f"{heads} with num_kv_attention_heads={kv_heads}: {problem}")


def _resolve_zero(parallel: ParallelConfig, source: ConfigSource) -> None:
    """The one place that decides the ZeRO stage. InternEvo's `zero1.fsdp=True` shards parameters, gradients and
    optimizer states over the data-parallel ranks (torch FSDP): what DeepSpeed's ZeRO-3 does."""
    zero = parallel.zero
    if parallel.zero1.fsdp and zero.stage not in (None, 3):
        raise source.error("parallel.zero.stage", f"parallel.zero.stage={zero.stage} contradicts parallel.zero1.fsdp="
                                                  f"True, which evods runs as ZeRO-3; remove one of the two keys")
    if zero.stage is None:
        zero.stage = 3 if parallel.zero1.fsdp else 1
    asked = "parallel.zero1.fsdp=True (ZeRO-3)" if parallel.zero1.fsdp else f"parallel.zero.stage={zero.stage}"
    where = "parallel.zero1.fsdp" if parallel.zero1.fsdp else "parallel.zero.stage"
    if zero.stage > 1 and parallel.pipeline.size > 1:
        raise source.error(where, f"{asked} cannot run with parallel.pipeline size {parallel.pipeline.size}: "
                                  f"DeepSpeed's pipeline engine keeps each stage's gradients and parameters whole "
                                  f"and runs ZeRO-1 only; use pipeline=1 or ZeRO stage 1")
    if zero.stage == 3 and parallel.tensor.size > 1 and parallel.tensor.mode != "isp":  # isp: _check_parallel
        raise source.error(where, f"{asked} cannot run with parallel.tensor size {parallel.tensor.size}: evods "
                                  f"builds a ZeRO-3 model already sharded over the data ranks (deepspeed.zero.Init),"
                                  f" while its tensor parallelism slices a whole model; use ZeRO stage 2 with "
                                  f"tensor parallelism, or tensor=1")
    if zero.offload_param and zero.stage != 3:
        raise source.error("parallel.zero.offload_param", f"parallel.zero.offload_param=True needs ZeRO stage 3 (only"
                                                          f" ZeRO-3 shards the parameters), but the stage is "
                                                          f"{zero.stage}; set parallel.zero.stage=3")
    if zero.offload_optimizer and zero.stage == 1:
        raise source.error("parallel.zero.offload_optimizer", "parallel.zero.offload_optimizer=True needs ZeRO stage "
                                                              "2 or 3 in evods; set parallel.zero.stage=2 (it also "
                                                              "shards the gradients, for the same communication)")


def _normalise_tensor_mode(parallel: ParallelConfig, source: ConfigSource) -> None:
    """The one place that maps parallel.tensor.mode. "msp" is Megatron tensor parallelism with Megatron sequence
    parallelism, what evods runs for mode="mtp" plus sequence_parallel=True (InternEvo's launch.py,
    `args_sanity_check`, also sets sequence_parallel=True for it). Unlike InternEvo, whose ParallelContext turns
    sequence_parallel off under mode="mtp", evods honours sequence_parallel=True there: it is the quickstart's key."""
    if parallel.tensor.mode == "msp":
        parallel.sequence_parallel = True
    refusals = {
        "fsp": 'parallel.tensor.mode="fsp" (flash-attn tensor parallelism with sequence parallelism) is not run by '
               'evods; use mode="mtp" (Megatron tensor parallelism)',
    }
    if parallel.tensor.mode in refusals:
        raise source.error("parallel.tensor.mode", refusals[parallel.tensor.mode])


def _normalise_ckpt(ckpt: CkptConfig, source: ConfigSource) -> None:
    if ckpt.load_ckpt_info is not None and ckpt.load_ckpt_info.path is None:
        # InternEvo's CheckpointManager trains from scratch then, without looking at the legacy keys
        ckpt.load_ckpt_info = ckpt.load_ckpt_folder = ckpt.load_model_only_folder = None
    if not ckpt.enable_save_ckpt:
        ckpt.checkpoint_every = ckpt.oss_snapshot_freq = math.inf
        ckpt.save_ckpt_folder = ckpt.snapshot_ckpt_folder = None
        ckpt.async_upload, ckpt.async_upload_tmp_folder = False, None
        return
    if ckpt.save_ckpt_folder is None:
        raise source.error("ckpt", "ckpt.save_ckpt_folder is required when ckpt.enable_save_ckpt=True: "
                                   "give a folder (e.g. 'local:llm_ckpts') or set enable_save_ckpt=False")
    snapshots = f"{ckpt.save_ckpt_folder.rstrip('/')}/{SNAPSHOT_FOLDER}"
    if ckpt.snapshot_ckpt_folder not in (None, snapshots):
        raise source.error("ckpt.snapshot_ckpt_folder",
                           f"ckpt.snapshot_ckpt_folder={ckpt.snapshot_ckpt_folder!r}: evods keeps snapshots in "
                           f"{snapshots} so that auto_resume finds them; remove the key")
    ckpt.snapshot_ckpt_folder = snapshots
    if ckpt.async_upload and not ckpt.save_ckpt_folder.startswith(("boto3:", "s3:")):
        logger.warning("ckpt.async_upload=True only works for boto3:/s3: save folders; saving to %s synchronously",
                       ckpt.save_ckpt_folder)
        ckpt.async_upload = False
    if not ckpt.async_upload:
        ckpt.async_upload_tmp_folder = None


def _normalise_optimizer(cfg: TrainConfig, source: ConfigSource) -> None:
    zero = cfg.hybrid_zero_optimizer
    if zero.zero_overlap_communication is not None:
        zero.overlap_sync_grad = zero.zero_overlap_communication
    schedule = cfg.lr_scheduler
    if schedule.total_steps is None:
        schedule.total_steps = cfg.data.total_steps
    if schedule.total_steps <= schedule.init_steps + schedule.warmup_steps:
        raise source.error("lr_scheduler", f"lr_scheduler.total_steps={schedule.total_steps} must exceed init_steps "
                                           f"({schedule.init_steps}) + warmup steps ({schedule.warmup_steps}) "
                                           f"so that the cosine phase has steps")
    beta2 = cfg.beta2_scheduler
    if beta2.init_beta2 is None:
        beta2.init_beta2 = cfg.adam.adam_beta2
    if beta2.c is None:
        beta2.c = cfg.adam.adam_beta2_c
