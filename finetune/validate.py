"""`ft validate`: everything `ft train` checks before it loads weights, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from finetune import data as data_mod
from finetune import render
from finetune.backends import check_unsloth_supports
from finetune.bases import resolve_base
from finetune.loading import check_module_settings, check_weights_format, load_tokenizer, lora_targets, skeleton, training_template
from finetune.recipe import Recipe, load_recipe


def validate_recipe(path: str, overrides: list[str] = (),
                    checks: Sequence[Callable[[Recipe, data_mod.Splits], str]] = ()) -> list[str]:
    """Raises UserError on the first class of problem found; returns what was checked. `checks`:
    later stages' checks, as `ft train` runs them (the CLI hands in eval's)."""
    recipe = load_recipe(path, overrides)
    report = [f"recipe {path}: every key known and typed (run name '{recipe.name}')"]
    if recipe.train.backend == "unsloth":
        check_unsloth_supports(recipe)
        report.append("train.backend unsloth: the recipe's 4-bit and LoRA settings are ones unsloth honours")
    splits = data_mod.load_splits(recipe)
    s = splits.stats
    report.append(f"data: {s['train']} training / {s['heldout']} held-out examples, format {splits.format}, "
                  f"{s['leaked_removed']} leaked duplicates removed")
    report += [check(recipe, splits) for check in checks]
    base = resolve_base(recipe.model.base)
    local = Path(base.path).is_dir()
    check_weights_format(base, recipe)
    report.append(f"model: {recipe.model.base} → {base.path} (family {base.family.name})")
    template, where = training_template(recipe, base.family)
    tokenizer = load_tokenizer(base, recipe) if local else None
    render.check_template(template, base.family, render.template_kwargs(base.family, recipe), where, tokenizer)
    report.append(f"chat template {where}: every assistant turn trains its end-of-turn token "
                  f"({' / '.join(base.family.end_of_turn)})" + ("" if local else " (tokenizer checked at train time)"))
    from finetune.train import check_optimizer

    check_optimizer(recipe)
    report.append(f"train.optimizer {recipe.train.optimizer}: known to transformers and installed")
    if local:  # a hub model's size is known once its config is here: checked at train time
        from finetune.preflight import preflight_train
        from finetune.run import run_for

        shape = skeleton(recipe, base)
        check_module_settings(recipe, base.family, shape.model)
        targets = lora_targets(recipe, base.family)
        report.append(f"lora.targets: {', '.join(targets)} (each a module of this model)")
        report += [f"preflight {line}" for line in preflight_train(
            recipe, base, shape, run_for(recipe.name, None).root, targets).lines]
    return report
