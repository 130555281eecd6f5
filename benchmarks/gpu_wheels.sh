#!/usr/bin/env bash
# Fetches, into DIR (default .whl), the wheels of the Python packages chopgrad and its tests need that a
# CUDA image commonly lacks, for CPython 3.12 on x86-64 Linux; benchmarks/gpu_session.sh installs them there.
#
#   benchmarks/gpu_wheels.sh [DIR]
#
# Run it on a machine with a package index; the versions are the newest the index offers. Only these
# packages are fetched, not what they need in turn: the rest (huggingface_hub, safetensors, regex, numpy,
# pillow, tqdm, matplotlib, requests, filelock) is part of common CUDA images; add names with EXTRA="a b".
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
# peft and transformers (for `chopgrad train --transformer` and benchmarks/gpu_train_step.py) are not fetched:
# the H200 image has them (the device library's KINDS.md), and with them the wheels would pass the 64 MiB a device
# call may carry. On another image: EXTRA="peft transformers tokenizers ...".
for name in diffusers av pytorch-msssim importlib-metadata zipp ${EXTRA:-}; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "$name" 2>&1 \
        | { grep -v "is ignored: it is neither" || true; }
done
ls -l "$DIR"
du -sh "$DIR"
