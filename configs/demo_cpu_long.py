# The demo model trained long enough on real English text to learn something, for the long-context evaluation
# (README, "Chat, the web demo and long context"). Training data: the C4 sample and three of the four Wikipedia
# articles; the fourth (Anarchism) is held out as the evaluation text:
#   mkdir -p data/long && tail -n +2 samples/pretrain_en/wiki_demo.txt > data/long/wiki_train.txt
#   head -n 1 samples/pretrain_en/wiki_demo.txt > data/long/heldout.txt
#   python tools/tokenizer.py --text_input_path data/long/wiki_train.txt --bin_output_path data/long/train/en/wiki.bin
#   python tools/tokenizer.py --text_input_path samples/pretrain_en/c4_demo.jsonl \
#       --bin_output_path data/long/train/en/c4.bin
#   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_long.py
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu_data.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_long"
TOTAL_STEPS = 300  # about 3.4 passes over the 45k training tokens, 512 tokens a step
data["train_folder"] = "data/long/train"  # noqa: F821 (data, ckpt, lr_scheduler and model come from demo_cpu.py)
data["total_steps"] = TOTAL_STEPS  # noqa: F821
lr_scheduler["total_steps"] = TOTAL_STEPS  # noqa: F821
ckpt["save_ckpt_folder"] = "local:demo_out/ckpt_long"  # noqa: F821
ckpt["checkpoint_every"] = TOTAL_STEPS  # noqa: F821
# The length the model trains at: past it, an exported model with dynamic NTK rescales its RoPE base.
model["max_position_embeddings"] = SEQ_LEN  # noqa: F821
monitor["log_every"] = 50  # noqa: F821
