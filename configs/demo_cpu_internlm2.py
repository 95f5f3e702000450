# configs/demo_cpu.py with InternLM2's architecture at CPU size: model_type "INTERNLM2", grouped-query attention (8
# query heads sharing 2 key/value heads), no biases, RoPE base 1e6 and InternLM2's MLP ratio; it trains on the same
# built-in random data, on two CPU ranks in a few minutes, and exports in InternLM's published InternLM2 layout:
#   OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train_ds.py --config configs/demo_cpu_internlm2.py
#   python tools/convert2hf.py --src demo_out/ckpt_internlm2/40 --tgt demo_out/hf_internlm2 --format internlm2 \
#       --tokenizer tools/tokenizer_internlm2.model   (model type INTERNLM2 chats in ChatML, InternLM2's format)
# The keys are InternEvo's (its configs/7B_internlm2.py); only the sizes, precision and schedule differ.
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_internlm2"
model_type = "INTERNLM2"
NUM_KV_ATTENTION_HEAD = 2

ckpt.update(save_ckpt_folder="local:demo_out/ckpt_internlm2")  # noqa: F821 (from demo_cpu.py)
model.update(  # noqa: F821 (the vocabulary stays demo_cpu.py's, which holds InternLM2's tokenizer's ids too)
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    no_bias=True,
    mlp_ratio=3.5,
    rope_base=1000000,
)
