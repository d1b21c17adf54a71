"""`ft validate`: everything `ft train` checks before it loads weights, without training.

The checks are `ft train`'s own (finetune/train/plan.py, one function both call), so a recipe
that validates is one that starts. The one difference is said, not hidden: a hub base this
machine cannot reach has no tokenizer or config here, so the checks that need them are listed
as not run (`ft train` downloads them, or stops saying why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from finetune.recipe import Recipe, load_recipe
from finetune.run import run_for
from finetune.train.plan import StageCheck, TrainingPlan, plan_training


@dataclass
class Validated:
    recipe: Recipe
    plan: TrainingPlan
    report: list[str]  # what was checked, one line each


def validate(path: str, overrides: list[str] = (), checks: Sequence[StageCheck] = ()) -> Validated:
    """Raises UserError at the first failing check. `checks`: later stages' checks, as `ft train`
    runs them (the CLI hands in eval's)."""
    recipe = load_recipe(path, overrides)
    plan = plan_training(recipe, run_for(recipe.name, None).root, checks=checks, without_model_files=True)
    report = [f"recipe {path}: every key known and typed (run name '{recipe.name}')", *plan.checked]
    if plan.not_checked:
        report.append(f"not checked here: {plan.not_checked}")
    return Validated(recipe, plan, report)


def validate_recipe(path: str, overrides: list[str] = (), checks: Sequence[StageCheck] = ()) -> list[str]:
    """What was checked, one line each (see `validate`)."""
    return validate(path, overrides, checks).report
