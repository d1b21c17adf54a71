"""The base model's answers, cached: they depend only on the base weights, the prompts and the
decoding settings, so every later fine-tune of the same base reuses them (`$FT_CACHE/eval/`)."""

from __future__ import annotations

import hashlib
import json

from finetune.run import atomic_write_bytes, cache_root, write_json


def cache_key(payload: list) -> str:
    """A short hash of what the answers depend on (anything JSON can write, paths as text)."""
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def read_cached(kind: str, key: str) -> list[dict] | None:
    path = cache_root() / "eval" / f"{kind}-{key}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def store(kind: str, key: str, rows: list[dict]) -> None:
    write_json(cache_root() / "eval" / f"{kind}-{key}.json", rows)


def read_cached_tensor(kind: str, key: str):
    """A tensor stored beside a cached column (safetensors: no pickle), or None."""
    from safetensors.torch import load_file

    path = cache_root() / "eval" / f"{kind}-{key}.safetensors"
    return load_file(str(path))["tensor"] if path.is_file() else None


def store_tensor(kind: str, key: str, tensor) -> None:
    from safetensors.torch import save

    atomic_write_bytes(cache_root() / "eval" / f"{kind}-{key}.safetensors", save({"tensor": tensor.contiguous()}))
