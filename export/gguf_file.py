"""Streaming merge → GGUF: every tensor is read, merged, transformed and written when the writer
reaches it, then dropped. gguf-py writes tensor infos before data, so each tensor is announced
with its final shape and type first and produced later (`Deferred`).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from export.arches import Arch, TensorPlan
from export.checkpoint import Checkpoint
from export.merge import Adapter

BLOCK_BYTES = 64 << 20  # rows are streamed in blocks of about this many fp32 bytes

FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "f32": gguf.LlamaFileType.ALL_F32}


class Deferred:
    """Looks like the numpy array gguf-py expects (shape, dtype, nbytes, tofile) but computes its
    bytes only when written, block by block."""

    def __init__(self, shape: tuple[int, ...], dtype, blocks):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self._blocks = blocks

    def tofile(self, fout) -> None:
        for block in self._blocks():
            np.ascontiguousarray(block).tofile(fout)


def encode(t: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "f32":
        return t.float().numpy()
    if kind == "f16":
        return t.to(torch.float16).numpy()
    # bf16: numpy has no such dtype; keep the raw bytes (gguf-py's raw_dtype path)
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().reshape(*t.shape[:-1], t.shape[-1] * 2)


def produce(ckpt: Checkpoint, adapter: Adapter | None, plan: TensorPlan, shape: tuple[int, ...], kind: str):
    delta = adapter.delta_for(plan.weight_name) if adapter else None

    def blocks():
        if plan.transform is None and len(shape) == 2:
            rows = max(1, BLOCK_BYTES // (4 * shape[1]))
            for start in range(0, shape[0], rows):
                part = slice(start, min(start + rows, shape[0]))
                t = ckpt.read(plan.source, part)
                yield encode(delta.apply(t, part) if delta else t, kind)
        else:
            t = ckpt.read(plan.source)
            if delta:
                t = delta.apply(t)
            yield encode(plan.transform(t) if plan.transform else t, kind)
    return blocks


def out_shape(ckpt: Checkpoint, plan: TensorPlan) -> tuple[int, ...]:
    shape = ckpt.shape(plan.source)
    return tuple(d for d in shape if d != 1) if ".ssm_conv1d." in plan.gguf_name else shape


def write_gguf(path: Path, arch: Arch, cfg: dict, ckpt: Checkpoint, adapter: Adapter | None, kind: str,
               add_tokenizer, metadata: dict) -> dict:
    """Write the merged model as one GGUF of type `kind` (f16, bf16, f32); returns a summary."""
    arch.check(cfg)
    plans = arch.plan(ckpt.text_tensors(), ckpt.shape, cfg)
    writer = gguf.GGUFWriter(str(path), arch.name)
    arch.metadata(writer, cfg)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_name(metadata["name"])
    writer.add_license(metadata["license"])
    add_tokenizer(writer)
    merged = 0
    for plan in plans:
        shape = out_shape(ckpt, plan)
        tensor_kind = "f32" if plan.force_f32 else kind
        if adapter and adapter.delta_for(plan.weight_name):
            merged += 1
        if tensor_kind == "bf16":
            stored = (*shape[:-1], shape[-1] * 2)
            writer.add_tensor(plan.gguf_name, Deferred(stored, np.uint8, produce(ckpt, adapter, plan, shape, "bf16")),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            dtype = np.float32 if tensor_kind == "f32" else np.float16
            writer.add_tensor(plan.gguf_name, Deferred(shape, dtype, produce(ckpt, adapter, plan, shape, tensor_kind)))
    expected = len(adapter.deltas) if adapter else 0
    if merged != expected:  # an adapter trained on names this checkpoint lacks: never ship half a merge
        missing = sorted(set(adapter.deltas) - {p.weight_name for p in plans})[:3]
        raise RuntimeError(f"{expected - merged} LoRA deltas matched no base tensor, e.g. {missing}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(plans), "lora_merged": merged, "skipped": ckpt.skipped()}
