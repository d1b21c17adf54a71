"""`ft validate`: everything `ft train` checks before it loads weights, without training."""

from __future__ import annotations

from pathlib import Path

from finetune import data as data_mod
from finetune import render
from finetune.backends import check_unsloth_supports
from finetune.bases import resolve_base
from finetune.recipe import load_recipe
from finetune.loading import check_weights_format, load_tokenizer, training_template


def validate_recipe(path: str, overrides: list[str] = ()) -> list[str]:
    """Raises UserError on the first class of problem found; returns what was checked."""
    recipe = load_recipe(path, overrides)
    report = [f"recipe {path}: every key known and typed (run name '{recipe.name}')"]
    if recipe.train.backend == "unsloth":
        check_unsloth_supports(recipe)
        report.append("train.backend unsloth: the recipe's 4-bit and LoRA settings are ones unsloth honours")
    splits = data_mod.load_splits(recipe)
    s = splits.stats
    report.append(f"data: {s['train']} training / {s['heldout']} held-out examples, format {splits.format}, "
                  f"{s['leaked_removed']} leaked duplicates removed")
    base = resolve_base(recipe.model.base)
    local = Path(base.path).is_dir()
    check_weights_format(base, recipe)
    report.append(f"model: {recipe.model.base} → {base.path} (family {base.family.name})")
    template, where = training_template(recipe, base.family)
    tokenizer = load_tokenizer(base, recipe) if local else None
    render.check_template(template, base.family, render.template_kwargs(base.family, recipe), where, tokenizer)
    report.append(f"chat template {where}: every assistant turn trains its end-of-turn token "
                  f"({' / '.join(base.family.end_of_turn)})" + ("" if local else " (tokenizer checked at train time)"))
    if local:  # a hub model's size is known once its config is here: checked at train time
        from finetune.preflight import preflight_train
        from finetune.run import run_for
        from finetune.loading import lora_targets

        report += [f"preflight {line}" for line in preflight_train(
            recipe, base, run_for(recipe.name, None).root, lora_targets(recipe, base.family)).lines]
    return report
