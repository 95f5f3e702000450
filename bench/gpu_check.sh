#!/usr/bin/env bash
# evods' CUDA paths, run once on a lent GPU machine (about 5 minutes on one H200): packed attention backends, a ~1B
# InternLM trained by train_ds.py through the deepspeed launcher (NCCL) in bf16 and fp16, with and without activation
# checkpointing, the train step and greedy decoding against transformers' Llama. Writes one Markdown table,
# $OUT/gpu_check.md, and the runs' logs, $OUT/gpu_check.log.
#
# The GPU machine has torch and CUDA but no network: build the wheels it lacks here first (bench/gpu_wheels.sh into
# build/gpu_wheels), then, with the device tool: run command `bash bench/gpu_check.sh`, carry ["build/gpu_wheels"].
# On a CPU machine, `bash bench/gpu_check.sh --smoke` runs every part with tiny sizes (to try the script for free).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-build/gpu_check_out}
mkdir -p "$OUT"
TABLE="$OUT/gpu_check.md"
LOG="$OUT/gpu_check.log"
: >"$TABLE"
: >"$LOG"
RUNS=$(mktemp -d)
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ $SMOKE = 1 ] && PY=.venv/bin/python

if [ -d build/gpu_wheels ] && [ $SMOKE = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        build/gpu_wheels/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$TABLE"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SMOKE_FLAG=()
if [ $SMOKE = 1 ]; then
    SMOKE_FLAG=(--smoke)
    export EVODS_BENCH_SMOKE=1 EVODS_CPU_FP16=1 OMP_NUM_THREADS=2
fi

{
    echo "# evods GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo CPU)"
    echo "- $("$PY" -c 'import sys, torch, transformers, deepspeed; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")' 2>>"$LOG" | tail -1)"
    echo "- flash-attn: $("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>/dev/null || echo 'not installed')"
} >>"$TABLE"

part() {  # part TIMEOUT LABEL COMMAND...: a failing or hanging part is a line in the table, and the next part runs
    local limit=$1 label=$2
    shift 2
    echo "== $label: $*" >>"$LOG"
    local start=$SECONDS
    # DeepSpeed logs its accelerator choice on stdout; the table keeps only the part's own lines
    timeout "$limit" "$@" 2>>"$LOG" | grep -v '^\[20' >>"$TABLE"
    local rc=${PIPESTATUS[0]}
    [ $rc = 0 ] || echo -e "\n**$label failed (exit $rc after $((SECONDS - start)) s); see gpu_check.log**" >>"$TABLE"
    echo "== $label: exit $rc in $((SECONDS - start)) s" >>"$LOG"
}

train() {  # train NAME DTYPE CHECKPOINT STEPS: train_ds.py on one device through the deepspeed launcher
    local name=$1
    echo "== train $name" >>"$LOG"
    local port
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    EVODS_BENCH_DTYPE=$2 EVODS_BENCH_CHECKPOINT=$3 EVODS_BENCH_STEPS=$4 timeout 150 \
        "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" train_ds.py \
        --config bench/gpu_1b.py --run_dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1
    echo "exit $?" >>"$RUNS/$name.log"
    grep -E "tflops=|WARNING|Error|error|peak GPU|finished|exit" "$RUNS/$name.log" | tail -40 >>"$LOG"
}

part 90 attention "$PY" bench/gpu_check.py attention "${SMOKE_FLAG[@]}"
STEPS=20
[ $SMOKE = 1 ] && STEPS=3
train bf16 torch.bfloat16 0 $STEPS
train bf16_recompute torch.bfloat16 1 $STEPS
train fp16 torch.float16 0 $((STEPS < 10 ? STEPS : 10))
part 30 runs "$PY" bench/gpu_check.py runs "$RUNS/bf16" "$RUNS/bf16_recompute" "$RUNS/fp16"
part 180 model "$PY" bench/gpu_check.py model "${SMOKE_FLAG[@]}"
cat "$TABLE"
