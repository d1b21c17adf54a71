"""Quantization through libllama's own `llama_model_quantize` (via llama-cpp-python): the same
pinned llama.cpp that verifies the file quantizes it, so the two cannot disagree on the format."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from finetune.recipe import QUANT_TYPES

# --quant name → llama_ftype (llama.h), largest first; f16/bf16 need no quantization step
FTYPES = {quant: f"LLAMA_FTYPE_MOSTLY_{quant.upper()}" for quant in QUANT_TYPES}
SIXTEEN_BIT = ("f16", "bf16")

# How many bytes of tensor rows llama.cpp's quantizer holds at once (source rows, their fp32
# copy, the quantized rows). Its default, 8 GiB, means "the whole tensor": a 248,320 × 4,096
# embedding is 3.8 GiB in fp32 alone, 93% of a 9B export's peak memory. In slabs of 256 MiB the
# output is byte for byte the same (rows are quantized independently; bench/export_memory.py).
QUANTIZE_BUFFER_BYTES = 256 << 20


def quantize(source: Path, target: Path, quant: str, threads: int | None = None, importance=None,
             buffer_bytes: int = QUANTIZE_BUFFER_BYTES) -> None:
    """`importance`: an export.imatrix.Importance to calibrate with, or None."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    params.max_buf_size = buffer_bytes
    keep = None
    if importance is not None:
        from export.imatrix import quantize_param

        entries, keep = quantize_param(importance)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    del keep  # the vectors llama.cpp read from, alive until it returned
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({quant}) failed with code {rc}")
