#!/usr/bin/env bash
# The main job on a 2-core CPU: train the demo config on two DeepSpeed ranks with the built-in random data.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The deepspeed launcher leaves OMP_NUM_THREADS alone; one thread per rank avoids oversubscribing 2 cores.
export OMP_NUM_THREADS=1
exec .venv/bin/deepspeed --num_gpus 2 --master_port "$PORT" train_ds.py --config configs/demo_cpu.py "$@"
