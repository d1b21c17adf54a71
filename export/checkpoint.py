"""Reading a base checkpoint one tensor at a time.

Safetensors shards are memory-mapped; a tensor is read only when asked for, and a large tensor
can be read in row blocks. Nothing here ever holds the whole model. Pickle checkpoints
(`*.bin`) are refused: loading one runs arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finetune.errors import UserError

# Prefixes a text export drops or rewrites: the hub Qwen3.5 checkpoints nest the text model under
# model.language_model. and carry a vision tower and an MTP head; llama.cpp's converter (conversion/base.py,
# llama.cpp as vendored by llama-cpp-python 0.3.36) strips the same prefix and skips the same tensors.
TEXT_PREFIX = "language_model."
SKIPPED = ("visual.", "vision_tower.", "mtp.", "audio.", "rotary_emb.inv_freq")


def local_snapshot(path_or_id: str, revision: str | None = None) -> Path:
    """A local folder for a base: itself, or the hub snapshot that training downloaded."""
    folder = Path(path_or_id)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        try:
            return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=patterns))
        except Exception as exc:
            raise UserError(f"cannot find the base weights of '{path_or_id}' ({type(exc).__name__})",
                            "ft export", "download the model (it is in the HF cache after ft train) or "
                            "point model.base at a local folder") from None


def read_config(folder: Path) -> dict:
    """config.json with `text_config` merged over the root, as a text-only converter needs it."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def normalize_name(name: str) -> str:
    return name.replace(TEXT_PREFIX, "")


def tensor_names(file: Path, folder: Path) -> list[str]:
    """The tensors a safetensors file holds, read from its header; a file cut short (an interrupted
    copy or download: the header promises more than the file holds) is the user's to fix."""
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise UserError(f"the base model's weights cannot be read: {file.name}: {exc}", f"model.base ({folder})",
                        "copy or download the checkpoint again") from None


@dataclass
class Checkpoint:
    folder: Path
    shards: dict[str, Path]  # original tensor name → shard file

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = {name: folder / file for name, file in weight_map.items()}
            for file in sorted(set(shards.values())):
                if not file.is_file():
                    raise UserError(f"the checkpoint's index names a missing file: {file.name}",
                                    f"model.base ({folder})", "copy or download the checkpoint again")
                tensor_names(file, folder)  # a shard cut short is refused here, before any work
        else:
            shards = {name: file for file in sorted(folder.glob("*.safetensors")) for name in tensor_names(file, folder)}
        if not shards:
            pickles = sorted(p.name for p in folder.glob("*.bin"))
            raise UserError(
                f"no safetensors weights in {folder}" + (f" (found pickle files {pickles[:3]})" if pickles else ""),
                "model.base", "convert the checkpoint to safetensors; ft does not load pickle files (they can run code)")
        return cls(folder, shards)

    def text_tensors(self) -> dict[str, str]:
        """Normalized name → original name, for the text model only."""
        return {normalize_name(n): n for n in self.shards if not any(s in n for s in SKIPPED)}

    def skipped(self) -> list[str]:
        return sorted(n for n in self.shards if any(s in n for s in SKIPPED))

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.shards[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or a block of its rows) as float32."""
        with safe_open(self.shards[name], framework="pt") as f:
            if rows is None:
                return f.get_tensor(name).float()
            return f.get_slice(name)[rows].float()
