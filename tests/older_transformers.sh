#!/usr/bin/env bash
# The training, packing, gradient and shared-prefix tests on the oldest transformers ft supports (5.17: what the
# unsloth extra pins and the GPU image carries; its Qwen3.5 layer repeats q/k before the delta
# rule, newer ones inside it). TRL stays at the installed >= 1.16: TRL 1.15 trains only through
# Triton kernels, so on a CPU it cannot train at all (ft says so, exit 2; tests/test_train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.older-transformers
# with the hub client it supports (huggingface_hub < 2, on httpx)
pip install -q --no-deps --target "$target" transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0
PYTHONPATH="$target" python -c "import transformers; assert transformers.__version__ == '5.17.0', transformers.__version__"
PYTHONPATH="$target" python -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_linear_attention.py tests/test_gradients.py tests/test_train.py tests/test_shared_prefix.py
