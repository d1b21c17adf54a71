"""The base model's answers, cached: they depend only on the base weights, the prompts and the
decoding settings, so every later fine-tune of the same base reuses them (`$FT_CACHE/eval/`)."""

from __future__ import annotations

import hashlib
import json

from finetune.run import cache_root, write_json


def cache_key(payload: list) -> str:
    """A short hash of what the answers depend on (anything JSON can write, paths as text)."""
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def read_cached(kind: str, key: str) -> list[dict] | None:
    path = cache_root() / "eval" / f"{kind}-{key}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def store(kind: str, key: str, rows: list[dict]) -> None:
    write_json(cache_root() / "eval" / f"{kind}-{key}.json", rows)
