#!/usr/bin/env bash
# Fetch exactly the wheels bench/gpu_check/run.sh installs on the GPU machine (no network there),
# for CPython 3.12 on manylinux x86_64, into .whl/ at the repo root (git-ignored; the device tool's
# `carry: [".whl"]` takes it along). bitsandbytes ships a library for every CUDA and ROCm version
# (43 MB); the image's torch is CUDA 13.0, so only that library and the CPU one are kept (5 MB):
# everything that travels, working tree included, must fit 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl -r bench/gpu_check/wheels.txt
python3 bench/gpu_check/wheels.py slim .whl --keep libbitsandbytes_cuda130.so --keep libbitsandbytes_cpu.so
python3 bench/gpu_check/wheels.py check .whl bench/gpu_check/wheels.txt
du -sh .whl
