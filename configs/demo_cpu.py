# A small InternLM that trains on a 2-core CPU in a couple of minutes, on InternEvo's built-in random data:
#   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu.py
# Same keys and meanings as configs/7B_sft.py; only the sizes, precision and schedule differ.
JOB_NAME = "demo_cpu"

SEQ_LEN = 256
HIDDEN_SIZE = 256
NUM_ATTENTION_HEAD = 8
MLP_RATIO = 8 / 3
NUM_LAYER = 4
VOCAB_SIZE = 103168  # V7_sft.model's vocabulary, so the same model also trains on real tokenized data
TOTAL_STEPS = 40

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="local:demo_out/ckpt",  # the last step's checkpoint: tools/demo.sh converts it to HF
    checkpoint_every=TOTAL_STEPS,
    auto_resume=False,  # every `make demo` trains from scratch; True would resume from demo_out/ckpt
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,  # micro-batches per optimizer step
    micro_bsz=1,  # packed_length = micro_bsz * SEQ_LEN
    valid_every=0,  # no validation
    pack_sample_into_one=False,
    total_steps=TOTAL_STEPS,
    skip_batches="",
    rampup_batch_size="",
    min_length=0,
    num_worker=0,  # packing is cheap; on 2 cores, loader processes would only compete with the two ranks
    # no train_folder: InternEvo's random dataset (see configs/demo_cpu_data.py for real data)
)

grad_scaler = dict(  # used only with dtype torch.float16
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(
    lr=1e-3,  # high for a tiny model, so the loss clearly falls within 40 steps
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_beta2_c=0,
    adam_eps=1e-8,
    weight_decay=0.01,
)

lr_scheduler = dict(
    total_steps=TOTAL_STEPS,
    init_steps=0,
    warmup_ratio=0.1,  # 4 warmup steps
    eta_min=1e-4,
    last_epoch=-1,
)

beta2_scheduler = dict(
    init_beta2=adam["adam_beta2"],
    c=adam["adam_beta2_c"],
    cur_iter=-1,
)

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
    dtype="torch.float32",  # CPUs train fp32 fastest; "torch.bfloat16" works too (fp16 does not, on CPU)
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=False,  # no flash-attn on CPU
    num_chunks=1,
)

parallel = dict(
    zero1=-1,
    tensor=1,
    pipeline=dict(size=1, interleaved_overlap=False),
    sequence_parallel=False,
)

cudnn_deterministic = False
cudnn_benchmark = False
enable_tb = False

monitor = dict(
    alert=dict(enable_feishu_alert=False, feishu_alert_address=None, light_monitor_address=None),
    log_every=10,  # evods: a progress line (steps done, time left) every 10 steps
)
