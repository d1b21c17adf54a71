"""`--format hf`: the merged model as a transformers checkpoint (for vLLM, TGI, transformers).

Same streaming merge as the GGUF path, tensor by tensor, into safetensors shards of at most
SHARD_BYTES, in the base's own dtype and tensor names (vision and MTP tensors are copied as they
are, so the folder loads with the base's architecture class).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from export.checkpoint import Checkpoint, normalize_name
from export.merge import Adapter

SHARD_BYTES = 2 << 30
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
COPIED = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def merged_tensor(ckpt: Checkpoint, adapter: Adapter, name: str) -> torch.Tensor:
    with safe_open(ckpt.shards[name], framework="pt") as f:
        tensor = f.get_tensor(name)
    delta = adapter.delta_for(normalize_name(name))
    return delta.apply(tensor.float()).to(tensor.dtype) if delta else tensor


def write_hf(out: Path, ckpt: Checkpoint, adapter: Adapter, base_dir: Path, adapter_dir: Path) -> dict:
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = sorted(ckpt.shards)
    sizes = {}
    for name in names:
        with safe_open(ckpt.shards[name], framework="pt") as f:
            piece = f.get_slice(name)
            sizes[name] = int(torch.tensor(piece.get_shape()).prod()) * DTYPE_BYTES[piece.get_dtype()]
    shards, current, total = [], [], 0
    for name in names:
        if current and total + sizes[name] > SHARD_BYTES:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += sizes[name]
    shards.append(current)
    weight_map = {}
    for i, group in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: merged_tensor(ckpt, adapter, n).contiguous() for n in group}, str(tmp / file),
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    for file in COPIED:
        if (base_dir / file).is_file():
            shutil.copy2(base_dir / file, tmp / file)
    for file in TOKENIZER_FILES:
        if (adapter_dir / file).is_file():
            shutil.copy2(adapter_dir / file, tmp / file)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"shards": len(shards), "tensors": len(names), "bytes": sum(sizes.values())}
