# configs/demo_cpu.py on real tokenized data (README, "Preparing data" and "Training"):
#   python tools/tokenizer.py --text_input_path samples/pretrain_en/wiki_demo.txt \
#       --bin_output_path data/train/en/wiki.bin
#   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_data.py
# TRAIN_FOLDER holds one folder per dataset type (en, cn, code, ...) with *.bin and *.bin.meta files; relative paths
# are read from the directory you launch in.
import os.path
import runpy

globals().update({name: value for name, value in runpy.run_path(
    os.path.join(os.path.dirname(__file__), "demo_cpu.py")).items() if not name.startswith("__")})

JOB_NAME = "demo_cpu_data"
TRAIN_FOLDER = "data/train"
data["train_folder"] = TRAIN_FOLDER  # noqa: F821 (data and ckpt come from demo_cpu.py)
ckpt["save_ckpt_folder"] = "local:demo_out/ckpt_data"  # noqa: F821 (beside the random-data demo's, not over it)
