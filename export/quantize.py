"""Quantization through libllama's own `llama_model_quantize` (via llama-cpp-python): the same
pinned llama.cpp that verifies the file quantizes it, so the two cannot disagree on the format."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# --quant name → llama_ftype (llama.h); f16/bf16 need no quantization step
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
SIXTEEN_BIT = ("f16", "bf16")


def quantize(source: Path, target: Path, quant: str, threads: int | None = None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({quant}) failed with code {rc}")
