"""Resolving a recipe's `model.base` to weights and a family: a registry alias (a hub checkpoint,
or a tiny twin that is built here on first use), a local folder, or a hub id.

This is the one module that needs both the registry (finetune/models.py, facts only) and the twin
builder (finetune/twins.py, which reads the registry's families): keeping it apart keeps those
two free of each other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.models import REGISTRY, Family, family_for_model_type, read_model_type
from finetune.twins import ensure_twin


@dataclass(frozen=True)
class ResolvedBase:
    """Where the base weights are and what family they belong to."""

    name: str  # what the recipe said
    path: str  # local folder, or hub id to download
    family: Family
    license: str


def resolve_base(name: str, where: str = "model.base") -> ResolvedBase:
    """Turn a recipe's `model.base` into a local folder (or hub id) and a family."""
    if name in REGISTRY:
        model = REGISTRY[name]
        if model.is_twin:  # built on first use
            return ResolvedBase(name, str(ensure_twin(name)), model.family, model.license)
        return ResolvedBase(name, model.hub_id, model.family, model.license)

    folder = Path(name)  # recipe loading already made a recipe-relative folder absolute
    if (folder / "config.json").is_file():
        family = family_for_model_type(read_model_type(folder), f"{folder}/config.json")
        return ResolvedBase(name, str(folder.resolve()), family, "see the model's card")

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
