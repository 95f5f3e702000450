#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh installs on a GPU machine that has torch, CUDA and most of evods' dependencies but no
# network: DeepSpeed (built here as a pure-Python wheel; its CUDA ops would JIT-compile if ever needed, and evods'
# training needs none of them), what DeepSpeed needs beyond that machine's image, and the transformers evods pins.
# The GPU machine runs Python 3.12 on x86-64; the versions match requirements.txt.
#
#     bash bench/gpu_wheels.sh          # -> build/gpu_wheels/*.whl (ignored by git; carried to the device)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
WHEELS=build/gpu_wheels
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
DS_BUILD_OPS=0 "$PIP" wheel --quiet --no-deps --no-binary deepspeed -w "$WHEELS" deepspeed==0.19.8
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" transformers==5.24.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5
ls -la "$WHEELS"
du -sh "$WHEELS"
