# The ~1B-parameter InternLM that bench/gpu_check.sh trains through train_ds.py on one GPU: hidden 2048, 16 layers,
# 16 heads, the V7 vocabulary (1.23B parameters), 4,096-token packed rows of InternEvo's random dataset.
# The check's variants come from the environment (a config is Python, as InternEvo's are):
#   EVODS_BENCH_DTYPE       torch.bfloat16 (default) or torch.float16
#   EVODS_BENCH_CHECKPOINT  1 to recompute every layer's activations in backward (default 0)
#   EVODS_BENCH_STEPS       optimizer steps (default 20)
#   EVODS_BENCH_SMOKE       1: a tiny model with the same code path, to try the script on a CPU machine
import os.path
import runpy

# configs/demo_cpu.py with the sizes, precision and schedule of this check: the keys stay the quickstart's.
globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py")).items() if not name.startswith("__")})

SMOKE = os.environ.get("EVODS_BENCH_SMOKE") == "1"
JOB_NAME = "gpu_1b"
TOTAL_STEPS = int(os.environ.get("EVODS_BENCH_STEPS", "20"))

ckpt = dict(enable_save_ckpt=False, auto_resume=False)
data.update(seq_len=256 if SMOKE else 4096, micro_num=1, total_steps=TOTAL_STEPS)  # noqa: F821
adam.update(lr=3e-4)  # noqa: F821
lr_scheduler.update(total_steps=TOTAL_STEPS, eta_min=3e-5)  # noqa: F821
model.update(  # noqa: F821
    checkpoint=os.environ.get("EVODS_BENCH_CHECKPOINT") == "1",
    hidden_size=64 if SMOKE else 2048,
    num_attention_heads=4 if SMOKE else 16,
    num_layers=2 if SMOKE else 16,
    dtype=os.environ.get("EVODS_BENCH_DTYPE", "torch.bfloat16"),
    use_flash_attn=True,
)
