# The ~1B-parameter InternLM that bench/gpu_check.sh trains through train_ds.py on one GPU: hidden 2048, 16 layers,
# 16 heads, the V7 vocabulary (1.23B parameters), 4,096-token packed rows of InternEvo's random dataset.
# The check's variants come from the environment (a config is Python, as InternEvo's are):
#   EVODS_BENCH_DTYPE       torch.bfloat16 (default) or torch.float16
#   EVODS_BENCH_CHECKPOINT  1 to recompute every layer's activations in backward (default 0)
#   EVODS_BENCH_STEPS       optimizer steps (default 20)
#   EVODS_BENCH_SMOKE       1: a tiny model with the same code path, to try the script on a CPU machine
import os

SMOKE = os.environ.get("EVODS_BENCH_SMOKE") == "1"
JOB_NAME = "gpu_1b"
TOTAL_STEPS = int(os.environ.get("EVODS_BENCH_STEPS", "20"))
SEQ_LEN = 256 if SMOKE else 4096
HIDDEN_SIZE = 64 if SMOKE else 2048
NUM_ATTENTION_HEAD = 4 if SMOKE else 16
NUM_LAYER = 2 if SMOKE else 16
VOCAB_SIZE = 103168

ckpt = dict(enable_save_ckpt=False, auto_resume=False)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=1,
    micro_bsz=1,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=TOTAL_STEPS,
    min_length=0,
    num_worker=0,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
loss = dict(label_smoothing=0)
adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=TOTAL_STEPS, init_steps=0, warmup_ratio=0.1, eta_min=3e-5, last_epoch=-1)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

model = dict(
    checkpoint=os.environ.get("EVODS_BENCH_CHECKPOINT") == "1",
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=8 / 3,
    apply_post_layer_norm=False,
    dtype=os.environ.get("EVODS_BENCH_DTYPE", "torch.bfloat16"),
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)

parallel = dict(zero1=-1, tensor=1, pipeline=dict(size=1, interleaved_overlap=False), sequence_parallel=False)
enable_tb = False
