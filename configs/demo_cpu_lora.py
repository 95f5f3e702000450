# configs/demo_cpu.py's model fine-tuned with LoRA adapters on 2 tensor ranks (README, "LoRA with tensor parallelism"):
#   make demo                      # trains the demo model and exports it to demo_out/hf (the base)
#   OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train_ds.py --config configs/demo_cpu_lora.py
#   python tools/convert2hf.py --src demo_out/ckpt_lora/20 --base demo_out/hf --tgt demo_out/hf_lora \
#       --tokenizer tools/V7_sft.model      # the base model with a peft adapter folder in demo_out/hf_lora/adapter
#   python tools/convert2hf.py --src demo_out/ckpt_lora/20 --base demo_out/hf --tgt demo_out/hf_lora_merged \
#       --tokenizer tools/V7_sft.model --merge
#   python tools/chat.py --model demo_out/hf_lora_merged --temperature 0
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_lora"
TOTAL_STEPS = 20
MODEL_ONLY_FOLDER = "demo_out/hf"  # the frozen base: an HF folder (or an evods / InternEvo checkpoint)
data["total_steps"] = TOTAL_STEPS  # noqa: F821 (data, ckpt, parallel, lr_scheduler come from demo_cpu.py)
lr_scheduler["total_steps"] = TOTAL_STEPS  # noqa: F821
ckpt["save_ckpt_folder"] = "local:demo_out/ckpt_lora"  # noqa: F821
ckpt["checkpoint_every"] = 10  # noqa: F821
ckpt["auto_resume"] = True  # noqa: F821  (a resume loads the base again, and the adapters from the checkpoint)
ckpt["load_ckpt_info"] = dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="hf")  # noqa: F821
parallel["tensor"] = dict(size=2, mode="mtp")  # noqa: F821
parallel["pipeline"] = dict(size=1)  # noqa: F821
# peft's LoraConfig names (alpha and dropout are accepted for lora_alpha and lora_dropout); the default targets are
# all seven projections: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
lora = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
