"""InternEvo's current configs (InternLM/InternEvo: configs/*.py and configs/_base_/), written out from their keys and
values for the loading tests, comments left out. The files share most sections, so each is assembled from the blocks
it has; `write_internevo_configs(root)` writes them under root/configs/ and returns {relative name: path}.
"""
from pathlib import Path

CONSTANTS = """\
SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = {mlp_ratio}
NUM_LAYER = 32
VOCAB_SIZE = {vocab_size}
"""
FOLDERS = """\
MODEL_ONLY_FOLDER = "local:llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
"""
CKPT_SAVING = """\
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
"""
CKPT_MODEL_ONLY = """\
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_folder="local:llm_ckpts/",
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=True,
""" + CKPT_SAVING
CKPT_SCRATCH = """\
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    auto_resume=False,
""" + CKPT_SAVING
DATA = """\
TRAIN_FOLDER = {train_folder}
VALID_FOLDER = {train_folder}
data = dict({data_type}
    seq_len=SEQ_LEN,
    micro_num={micro_num},
    micro_bsz={micro_bsz},
    valid_micro_num=4,
    valid_every={valid_every},
    pack_sample_into_one=False,
    total_steps={total_steps},
    skip_batches="",
    rampup_batch_size="",
    min_length=50,
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)
"""
GRAD_SCALER = """\
grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)
"""
ZERO_OPTIMIZER = """\
hybrid_zero_optimizer = dict(
    overlap_sync_grad={overlap_sync_grad},
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)
"""
OPTIMIZER = """\
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)
"""
MODEL_V1 = """\
use_fp32_norm = False
model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,{extra}
)
"""
MODEL_V2 = MODEL_V1.format(extra="\n    no_bias=True,\n    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,")
PARALLEL = """\
parallel = dict(
    zero1=dict({zero1}),
    tensor=dict(size={tensor}, mode="{mode}"),
    pipeline=dict(size={pipeline}, interleaved_overlap=True{pipeline_mode}),
    weight=dict(size={weight}, overlap=True{weight_tuning}),{sequence_2d}
)
"""
GENERATION = """\
generation = dict(
    ckpt_folder="/path/to/saved/ckpt",
    output_folder="/path/to/save/generation",
    batch_size=1,
    eos_id=[2, 0],
    bos_id=1,
    max_length=100,
    do_sample=True,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    repetition_penalty=1,
    length_penalty=1.0,
)
"""
CUDNN = """\
cudnn_deterministic = False
cudnn_benchmark = False
"""
MONITOR = """\
monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
        alert_file_path=f"llm_alter/{JOB_NAME}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
"""
MOE = """\
moe = dict(
    top_k=2,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    min_capacity=4,
    noisy_gate_policy=None,
    drop_tokens=True,
    use_rts=True,
)
model_type = "INTERNLM_MoE"
"""
MOE_MODEL_KEYS = """
    num_experts=4,
    moe_use_residual=False,
    moe_type="GShard","""



def _job(name: str, model_type: str = "") -> str:
    return f'JOB_NAME = "{name}"\n' + (f'model_type="{model_type}"\n' if model_type else "") + "DO_ALERT = False\n"


def _parallel(zero1: str, tensor: int = 1, mode: str = "mtp", weight: int = 1, pipeline: int = 1,
              pipeline_mode: str = "", weight_tuning: str = "memory_pool=True", sequence_2d: str = "") -> str:
    return PARALLEL.format(zero1=f"size={zero1}", tensor=tensor, mode=mode, weight=weight, pipeline=pipeline,
                           pipeline_mode=f', mode="{pipeline_mode}"' if pipeline_mode else "",
                           weight_tuning=f", {weight_tuning}" if weight_tuning else "", sequence_2d=sequence_2d)


def _data(micro_bsz: int, valid_every: int, total_steps: int, micro_num: int = 4, train_folder: str = "None",
          data_type: bool = False) -> str:
    return DATA.format(micro_bsz=micro_bsz, valid_every=valid_every, total_steps=total_steps, micro_num=micro_num,
                       train_folder=train_folder, data_type='\n    type="tokenized",' if data_type else "")


def _v1_sft(job: str, mlp_ratio: str, overlap: bool, loss: str, model_extra: str, parallel: str) -> str:
    return (_job(job) + CONSTANTS.format(mlp_ratio=mlp_ratio, vocab_size=103168) + FOLDERS + CKPT_MODEL_ONLY
            + _data(2, 50, 50000) + GRAD_SCALER
            + ZERO_OPTIMIZER.format(overlap_sync_grad=overlap) + loss + OPTIMIZER + MODEL_V1.format(extra=model_extra)
            + parallel + CUDNN + MONITOR)


def _v2_constants(vocab_size: int, mlp_ratio, kv: int, seq_len: str = "2048", hidden: int = 4096, heads: int = 32,
                  layers: int = 32) -> str:
    return (f"VOCAB_SIZE = {vocab_size}\nSEQ_LEN = {seq_len}\nHIDDEN_SIZE = {hidden}\nNUM_ATTENTION_HEAD = {heads}\n"
            f"NUM_KV_ATTENTION_HEAD = {kv}\nMLP_RATIO = {mlp_ratio}\nNUM_LAYER = {layers}\n")


V2_LOSS = 'loss = dict(label_smoothing=0, op_type="py_vocab_parallel")\n'
MTP = _parallel("-1")
TOP_LEVEL = {
    "7B_sft.py": _v1_sft("7b_train", "8 / 3", True, "loss = dict(label_smoothing=0)\n", "", MTP),
    "7B_isp_sft.py": _v1_sft("7b_train", "8 / 3", True, "loss = dict(label_smoothing=0)\n", "",
                             _parallel("-1", tensor=2, mode="isp", weight=4)),
    "7B_MoE4_sft.py": _v1_sft("7b_moe_train", "4 / 3", False, "loss = dict(label_smoothing=0, moe_loss_coeff=0.1)\n",
                              MOE_MODEL_KEYS, _parallel("-1, fsdp=False")) + MOE,
    # InternEvo at 0aa6d26 (7B), 68f358e (20B) and 3a665e8 (InternLM3): intern sequence parallelism everywhere
    "7B_internlm2.py": (_job("7b_internlm2_train", "INTERNLM2_PUBLIC") + _v2_constants(92544, 3.5, 8) + FOLDERS
                        + CKPT_SCRATCH + _data(1, 0, 20000) + GRAD_SCALER
                        + ZERO_OPTIMIZER.format(overlap_sync_grad=True)
                        + "loss = dict(label_smoothing=0)\n" + OPTIMIZER
                        + MODEL_V2.replace("\n)", "\n    qk_interleaved=False,\n)")
                        + _parallel("-1", tensor=2, mode="isp", weight=2, weight_tuning="")
                        + CUDNN + MONITOR + GENERATION),
    "20B_internlm2.py": (_job("7b_internlm2_train", "INTERNLM2")
                         + _v2_constants(92544, "8 / 3", 8, seq_len="16*1024", hidden=6144, heads=48, layers=48)
                         + FOLDERS + CKPT_SCRATCH
                         + _data(1, 0, 50, train_folder='"/mnt/petrelfs/share_data/train_ds/tokenized_data"',
                                 data_type=True)
                         + GRAD_SCALER + ZERO_OPTIMIZER.format(overlap_sync_grad=True) + V2_LOSS + OPTIMIZER
                         + MODEL_V2.replace("checkpoint=False", "checkpoint=0.5").replace(
                             "\n)", "\n    qk_interleaved=False,\n)")
                         + _parallel("8", mode="isp", weight=4, pipeline=4, pipeline_mode="1f1b",
                                     weight_tuning='launch_allgather_before="wo", forward_overlap_per="layer"')
                         + CUDNN + MONITOR + GENERATION
                         + "selective_checkpoint = True\nselective_checkpoint_offload = False\n"),
    "8B_internlm3.py": (_job("8b_internlm3_train", "INTERNLM3")
                        + _v2_constants(128512, 2.5, 2, seq_len="4096", layers=48)
                        + 'MODEL_ONLY_FOLDER = None\nSAVE_CKPT_FOLDER = None\nCHECKPOINT_EVERY = 50\n'
                        + CKPT_MODEL_ONLY.replace('"internevo"', '"hf"')
                        .replace("auto_resume=True", "auto_resume=False")
                        .replace('    load_ckpt_folder="local:llm_ckpts/",\n', "")
                        .replace("\n)", "\n    enable_internevo2hf_ckpt=False,\n)")
                        + _data(2, 0, 20000, micro_num=1) + GRAD_SCALER
                        + ZERO_OPTIMIZER.format(overlap_sync_grad=True).replace("overlap_sync_param=False",
                                                                                "overlap_sync_param=True")
                        + V2_LOSS + OPTIMIZER
                        + MODEL_V2.replace("\n)", "\n    qk_interleaved=False,\n    rope_base=50000000,\n"
                                                   "    enable_qkv_fusion=False,\n)")
                        + _parallel("1", mode="isp", weight=16,
                                    weight_tuning='launch_allgather_before="wo", forward_overlap_per="module"',
                                    sequence_2d="\n    sequence_2D=dict(enable=False, head_size=2, context_size=4, "
                                                "window_size=1,\n        device_placement_strategy=dict("
                                                "head_first=True, interleaved=False)),")
                        + CUDNN + MONITOR + GENERATION),
    "7B_llama2.py": (_job("7b_llama2_train", "LLAMA2") + _v2_constants(32000, 3.5, 8) + FOLDERS + CKPT_SCRATCH
                     + _data(1, 0, 20) + GRAD_SCALER + ZERO_OPTIMIZER.format(overlap_sync_grad=True)
                     + "loss = dict(label_smoothing=0)\n" + OPTIMIZER + MODEL_V2 + MTP + CUDNN + MONITOR),
}

DEMO = ("from internlm.utils.utils import read_base\n\n"
        "with read_base():\n"
        "    from configs._base_.default_runtime import *\n"
        "    from configs._base_.models.internlm2_7B import *\n\n"
        + _job("7b_train") + CONSTANTS.format(mlp_ratio="8 / 3", vocab_size=103168)
        + 'SAVE_CKPT_FOLDER = "local:llm_ckpts"\nLOAD_CKPT_FOLDER = "local:llm_ckpts/49"\nLOAD_CKPT_FOLDER = None\n'
        + "CHECKPOINT_EVERY = 50\n"
        + CKPT_SCRATCH.replace("    auto_resume=False,\n", '    load_ckpt_info=dict(path=LOAD_CKPT_FOLDER, '
                               'content=("model",), ckpt_type="internevo"),\n    auto_resume=False,\n')
        + _data(2, 50, 50000) + GRAD_SCALER
        + ZERO_OPTIMIZER.format(overlap_sync_grad=True) + "loss = dict(label_smoothing=0)\n" + OPTIMIZER + MONITOR
        + "use_fp32_norm = False\n")

DEFAULT_RUNTIME = CUDNN + "enable_tb = True\n" + GRAD_SCALER


def _base_model(model_type: str, dims: dict, checkpoint, tail: str, parallel: str) -> str:
    constants = "".join(f"{name} = {value}\n" for name, value in dims.items())
    model = (f'model = dict(\n    num_chunks=1,\n    checkpoint={checkpoint},\n    dtype="torch.bfloat16",\n'
             "    embed_split_hidden=True,\n    num_layers=NUM_LAYER,\n    hidden_size=HIDDEN_SIZE,\n"
             "    vocab_size=VOCAB_SIZE,\n    embed_grad_scale=1,\n    parallel_output=True,\n"
             "    num_attention_heads=NUM_ATTENTION_HEAD,\n" + tail + ")\n")
    return (f'model_type = "{model_type}"\n' + constants + model + ZERO_OPTIMIZER.format(overlap_sync_grad=True)
            + parallel)


V1_TAIL = """\
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    apply_post_layer_norm=False,
    layer_norm_epsilon=1e-5,
"""


def _v2_tail(qk_interleaved: bool = False, multiple_of: str = "", norm_head: str = "") -> str:
    return ("    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,\n    mlp_ratio=MLP_RATIO,\n" + multiple_of
            + f'    norm_type="rmsnorm",\n    qk_interleaved={qk_interleaved},\n    apply_post_layer_norm=False,\n'
            + "    no_bias=True,\n    layer_norm_epsilon=1e-5,\n    rope_base=1000000,\n" + norm_head)


def _dims(vocab, hidden, heads, mlp, layers, kv=None, **more) -> dict:
    dims = dict(VOCAB_SIZE=vocab, HIDDEN_SIZE=hidden, NUM_ATTENTION_HEAD=heads)
    if kv:
        dims["NUM_KV_ATTENTION_HEAD"] = kv
    return {**dims, **more, "MLP_RATIO": mlp, "NUM_LAYER": layers}


# InternEvo at 0aa6d26 (1B), ced627b (7B), a78b4de (20B)
BASES = {
    "_base_/default_runtime.py": DEFAULT_RUNTIME,
    "_base_/models/internlm_7B.py": _base_model("INTERNLM", _dims(103168, 4096, 32, "8 / 3", 32), False, V1_TAIL,
                                                _parallel("8")),
    "_base_/models/internlm_20B.py": _base_model("INTERNLM", _dims(103168, 5120, 40, "8 / 3", 60), False, V1_TAIL,
                                                 _parallel("8", tensor=4)),
    "_base_/models/internlm2_1B.py": _base_model(
        "INTERNLM2_PUBLIC", _dims(92544, 2048, 16, 4, 24, kv=8, MULTIPLE_OF=128), 0.2,
        _v2_tail(multiple_of="    multiple_of=MULTIPLE_OF,\n", norm_head="    norm_head=True,\n"), _parallel("8")),
    "_base_/models/internlm2_7B.py": _base_model("INTERNLM2_PUBLIC", _dims(92544, 4096, 32, 3.5, 32, kv=8), 0.2,
                                                 _v2_tail(qk_interleaved=True), _parallel("8")),
    "_base_/models/internlm2_20B.py": _base_model("INTERNLM2_PUBLIC", _dims(92544, 6144, 48, "8 / 3", 48, kv=8), 1.0,
                                                  _v2_tail(), _parallel("16", tensor=2, mode="fsp")),
}


def write_internevo_configs(root: Path) -> dict[str, Path]:
    """InternEvo's configs folder under root (root/configs/...); {name relative to configs/: path}."""
    files = {**TOP_LEVEL, "demo.py": DEMO, **BASES}
    paths = {}
    for name, text in files.items():
        path = root / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths[name] = path
    return paths
