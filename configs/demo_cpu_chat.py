# configs/demo_cpu.py fine-tuned on conversations in InternLM2's chat format (README, "Fine-tuning on conversations"):
#   python tools/chat_tokenizer.py samples/chat/sharegpt_en_demo.json data/chat \
#       --tokenizer_path tools/tokenizer_internlm2.model --template internlm2
#   OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train_ds.py --config configs/demo_cpu_chat.py
#   python tools/convert2hf.py --src demo_out/ckpt_chat/60 --tgt demo_out/hf_chat \
#       --tokenizer tools/tokenizer_internlm2.model
#   python tools/chat.py --model demo_out/hf_chat --temperature 0
# Only the replies (and the <|im_end|> after each) are trained: the tool writes every other token negative.
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_chat"
TOTAL_STEPS = 60
data["train_folder"] = "data/chat/train"  # noqa: F821 (data, ckpt, lr_scheduler and model come from demo_cpu.py)
data["valid_folder"] = "data/chat/valid"  # noqa: F821
data["valid_every"] = 20  # noqa: F821
data["total_steps"] = TOTAL_STEPS  # noqa: F821
lr_scheduler["total_steps"] = TOTAL_STEPS  # noqa: F821
ckpt["save_ckpt_folder"] = "local:demo_out/ckpt_chat"  # noqa: F821
ckpt["checkpoint_every"] = TOTAL_STEPS  # noqa: F821
model["vocab_size"] = 92544  # tokenizer_internlm2.model's vocabulary  # noqa: F821
# The chat format of the data: the checkpoints carry it, so the export's chat template and model.chat use it too.
model["chat_template"] = "internlm2"  # noqa: F821
