"""Every published size, before anything is downloaded: `ft models --sizes` and README's table.

Each hub alias carries its published config's shape (finetune/models.py). From it ft builds the
model on the meta device (no memory, no weights) and runs the same memory estimate preflight prints
before a run, at a recipe's settings: the shipped `support.yaml` for every size, and the laptop
recipe for the size it was written for.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from finetune.loading import lora_targets, meta_model
from finetune.models import OLMO3, QWEN3_5, REGISTRY, BaseModel
from finetune.preflight import Memory, count_parameters, human, memory_estimate

# finetune/recipes links to the top-level recipes/, so the wheel carries them as package data
# (pyproject.toml) and an installed ft reads the same files as a checkout
RECIPES = Path(str(resources.files("finetune").joinpath("recipes")))
GPU_RECIPE = RECIPES / "support.yaml"
LAPTOP_RECIPE = RECIPES / "laptop-qwen3.5-0.8b.yaml"


def text_config(model: BaseModel):
    """A transformers config of the published shape (the text model only)."""
    from transformers import Olmo3Config, Qwen3_5TextConfig

    s = model.shape
    common = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  head_dim=s.head_dim, tie_word_embeddings=s.tied_embeddings)
    if model.family is QWEN3_5:
        return Qwen3_5TextConfig(**common, linear_num_key_heads=s.linear_key_heads,
                                 linear_num_value_heads=s.linear_value_heads, linear_key_head_dim=128,
                                 linear_value_head_dim=128)
    if model.family is OLMO3:
        return Olmo3Config(**common)
    raise ValueError(f"no shape builder for family {model.family.name}")


@dataclass
class SizeEstimate:
    alias: str
    parameters: int
    embedding: int  # embedding + lm_head parameters (once when tied)
    gpu: Memory  # bf16 compute, 4-bit base, gradient checkpointing on
    cpu: Memory  # fp32 compute, the same


def estimate(alias: str, recipe_path: Path = GPU_RECIPE) -> SizeEstimate:
    from finetune.recipe import load_recipe

    model = REGISTRY[alias]
    recipe = load_recipe(recipe_path, [f"model.base={alias}"])
    config = text_config(model)
    params, embed, lora = count_parameters(meta_model(config), lora_targets(recipe, model.family), recipe.lora.r)
    # the shipped recipes leave checkpointing on auto, which turns it on at these sizes
    on = recipe.train.gradient_checkpointing is not False
    return SizeEstimate(alias, params, embed,
                        memory_estimate(recipe, config, params, embed, lora, gpu=True, checkpointing=on),
                        memory_estimate(recipe, config, params, embed, lora, gpu=False, checkpointing=on))


def published() -> list[BaseModel]:
    """Hub aliases with a published shape, one per shape (a base shares its size's shape)."""
    seen, models = set(), []
    for model in REGISTRY.values():
        if model.shape is not None and model.shape not in seen:
            seen.add(model.shape)
            models.append(model)
    return models


def sizes_markdown() -> str:
    """README's per-size table (tests/test_readme.py keeps the two identical)."""
    rows = ["| aliases | layers × hidden, FFN | attention heads / KV × dim | GDN key / value heads | vocabulary "
            "| embeddings | parameters (embedding) | GPU, `support.yaml` | CPU, `support.yaml` | source |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    bases = {m.shape: a for a, m in REGISTRY.items() if a.endswith("-base") and m.shape is not None}

    def row(aliases: str, model: BaseModel, e: SizeEstimate, source: str) -> str:
        s = model.shape
        gdn = f"{s.linear_key_heads} / {s.linear_value_heads}" if s.linear_key_heads else "–"
        return (f"| {aliases} | {s.layers} × {s.hidden}, {s.intermediate} | {s.heads} / {s.kv_heads} × {s.head_dim} "
                f"| {gdn} | {s.vocab:,} | {'tied' if s.tied_embeddings else 'untied'} "
                f"| {e.parameters / 1e9:.2f} B ({e.embedding / 1e9:.2f} B) | {human(e.gpu.total)} "
                f"| {human(e.cpu.total)} | {source} |")

    for model in published():
        names = dict.fromkeys([model.alias, bases.get(model.shape, model.alias)])
        rows.append(row(", ".join(f"`{a}`" for a in names), model, estimate(model.alias),
                        f"[config.json]({model.shape.config})"))
    small = REGISTRY["qwen3.5-0.8b"]
    rows.append(row("`qwen3.5-0.8b`", small, estimate(small.alias, LAPTOP_RECIPE),
                    f"at `{LAPTOP_RECIPE.name}`'s settings"))
    return "\n".join(rows)
