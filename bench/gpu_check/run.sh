#!/usr/bin/env bash
# The GPU check in one command, on a machine like the device tool's nvidia-h200 (one GPU, no
# network, torch 2.11 + CUDA 13, transformers 5.17; see wheels.txt). From the repo root, with .whl
# carried (bench/gpu_check/download.sh):
#
#     bash bench/gpu_check/run.sh          # at most 450 s of command time; results and logs in $OUT
#
# 1. the packed-vs-padded equivalence test on fla's path (its chunked delta rule with cu_seqlens,
#    the "fla" case: causal-conv1d is not carried, so the conv is ft's PyTorch version), ft's calls
#    into the kernels, and the PyTorch path;
# 2. bench/gpu_train.py at the real widths and vocabulary of Qwen3.5-9B, 8 of its 32 layers:
#    ft (hf backend) against the TRL-docs QLoRA script (unsloth is not carried: listed as not run).
#    Each contender's figures reach $OUT/gpu_train.partial.json as soon as it finishes.
#
# The budget, under the device's 480 s aim and 600 s limit on one command: install about 20 s
# (no limit: it either works quickly or fails), packing tests 90 s, the training bench 330 s.
set -uo pipefail
PACKING_S=90 TRAIN_S=330
echo "budget: install ~20 s + packing ${PACKING_S} s + training bench ${TRAIN_S} s = $((20 + PACKING_S + TRAIN_S)) s"
OUT=${OUT:-/tmp/ft-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FT_CACHE=/tmp/ft-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, trl, peft, accelerate, bitsandbytes, datasets, fla
print('torch', torch.__version__, torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__,
      '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', bitsandbytes.__version__,
      '| datasets', datasets.__version__, '| fla', fla.__version__)" | tee -a "$OUT/machine.txt" || exit 1
timeout $PACKING_S python3 -m pytest -q -p no:cacheprovider tests/test_packing.py 2>&1 | tee "$OUT/packing.log"
timeout $TRAIN_S python3 -m bench.gpu_train --size full --layers 8 --steps 20 --out "$OUT/gpu_train.json" 2>&1 \
  | tee "$OUT/gpu_train.log"
