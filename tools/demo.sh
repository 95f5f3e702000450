#!/usr/bin/env bash
# The main job on a 2-core CPU: train the demo config on two DeepSpeed ranks with the built-in random data, then
# convert the last checkpoint to a Hugging Face folder and generate from it with `from_pretrained`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The deepspeed launcher leaves OMP_NUM_THREADS alone; one thread per rank avoids oversubscribing 2 cores.
# DS_ACCELERATOR=cpu: DeepSpeed would otherwise warn that it found no GPU; --quiet: the launcher's own INFO lines.
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
.venv/bin/deepspeed --quiet --num_gpus 2 --master_port "$PORT" train_ds.py --config configs/demo_cpu.py

STEP=$($PY -c 'import runpy; print(runpy.run_path("configs/demo_cpu.py")["TOTAL_STEPS"])')
# with the tokenizer, so that tools/chat.py and tools/web_demo.py can serve the folder
$PY tools/convert2hf.py --src "demo_out/ckpt/$STEP" --tgt demo_out/hf --tokenizer tools/V7_sft.model
# InternEvo's random data is counting: [n, r, 0, 1, .., n-1, 0, 1, ..], so even 40 steps teach the model to count
# on (token 2 is a number here, not end-of-text).
echo "prompt 4,50,0,1,2,3,0,1 -> the model continues with:"
$PY tools/generate.py --model demo_out/hf --token_ids 4,50,0,1,2,3,0,1 --max_new_tokens 12 --ignore_eos
# the demo's loss curves (and lr, grad norm, tgs) as a picture; it prints where the PNG went
$PY tools/plot_metrics.py "$(ls -td runs/demo_cpu/*/ | head -1)"

cat <<NEXT

Done: a model trained on two DeepSpeed ranks, saved (demo_out/ckpt/$STEP) and exported to Hugging Face (demo_out/hf).
What to run next, from this folder:

1. Chat with the exported model in the terminal (replies stream as they are generated; /reset, /exit; Ctrl-C
   stops a reply). It learnt InternEvo's counting data, not language: expect gibberish back until it trains on text (2).
   .venv/bin/python tools/chat.py --model demo_out/hf --temperature 0 --max_new_tokens 24
   The same in the browser, with a dynamic NTK switch (README, "Chat, the web demo and long context"):
   .venv/bin/python tools/web_demo.py --model demo_out/hf     # then open http://127.0.0.1:7860

2. Train on real text (tokenize the sample, then the same model on it):
   .venv/bin/python tools/tokenizer.py --text_input_path samples/pretrain_en/wiki_demo.txt --bin_output_path data/train/en/wiki.bin
   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_data.py

3. Resume the demo from its checkpoint and train $STEP steps more:
   OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/deepspeed --quiet --num_gpus 2 train_ds.py --config configs/demo_cpu_resume.py
NEXT
