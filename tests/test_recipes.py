"""Every shipped recipe validates; every bad recipe gets one clear message with its YAML line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.recipe import Recipe, load_recipe, recipe_keys
from finetune.validate import validate_recipe
from tests.conftest import ROOT, run_ft

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path):
    report = validate_recipe(str(path))
    assert any(line.startswith("chat template") for line in report)
    recipe = load_recipe(path)
    assert all(Path(s.path).is_file() for s in recipe.data.sources)  # resolved against the recipe's folder


def test_shipped_recipes_cover_both_real_models():
    bases = {load_recipe(p).model.base for p in RECIPES}
    assert {"qwen3.5-9b", "olmo3-7b", "smollm2-135m", "tiny-qwen3.5"} <= bases


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


GOOD = f"""
model:
  base: tiny-qwen3.5
data:
  train: {ROOT}/datasets/support/train.jsonl
  heldout: {ROOT}/datasets/support/heldout.jsonl
"""


def test_defaults_and_name_from_file(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD, "my-job.yaml"))
    assert recipe.name == "my-job"
    assert recipe.lora.r == 16 and recipe.train.scheduler == "cosine" and recipe.export.quant == "q4_k_m"


def test_override_sets_typed_value(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["train.lr=1e-4", "lora.targets=[q_proj, v_proj]"])
    assert recipe.train.lr == 1e-4
    assert recipe.lora.targets == ["q_proj", "v_proj"]


def test_all_problems_reported_at_once_with_lines(tmp_path):
    path = write(tmp_path, GOOD + "train:\n  lr: fast\n  epocs: 2\nlora:\n  r: 0\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    text = info.value.render()
    assert "3 problems" in text
    assert f"{path}:7 train.lr" in text  # `lr: fast` is on line 7
    assert "unknown key 'epocs'" in text and "did you mean 'epochs'" in text
    assert f"{path}:8 train.epocs" in text
    assert f"{path}:10 lora.r" in text


def test_override_error_names_the_flag(tmp_path):
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, GOOD), ["train.lr=-1"])
    assert "--set train.lr" in info.value.render()


def test_recipe_keys_table_lists_every_key():
    keys = {row[0] for row in recipe_keys()}
    assert {"model.base", "data.columns", "lora.r", "train.lr", "export.quant"} <= keys
    assert len(keys) == sum(1 for _ in recipe_keys())
    assert "model" in Recipe.model_fields


BAD = {
    "unknown key": (GOOD + "train:\n  learning_rate: 1e-4\n", ":7 train.learning_rate",
                    "did you mean 'lr'"),
    "wrong type": (GOOD + "train:\n  batch_size: eight\n", ":7 train.batch_size", "valid integer"),
    "missing file": (GOOD.replace("heldout.jsonl", "nope.jsonl"), "nope.jsonl", "data file not found"),
    "unknown model": (GOOD.replace("tiny-qwen3.5", "tiny-qwen3.6"), "model.base",
                      "did you mean 'tiny-qwen3.5'"),
    "bad yaml": (GOOD + "train: [oops\n", ":", "not valid YAML"),
    "bad name": (GOOD + "name: ../escape\n", "name", "letters, digits"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_one_clear_message_exit_2(tmp_path, case):
    text, where, what = BAD[case]
    path = write(tmp_path, text)
    result = run_ft("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
    assert where in result.stderr and what in result.stderr
    assert "fix:" in result.stderr


def test_custom_template_without_end_of_turn_is_refused(tmp_path):
    from finetune.models import QWEN3_5

    official = QWEN3_5.read_template(training=True)
    broken = official.replace("{{- '<|im_end|>' }}\n        {%- endgeneration %}",
                              "{%- endgeneration %}\n        {{- '<|im_end|>' }}")
    assert broken != official
    (tmp_path / "t.jinja").write_text(broken, encoding="utf-8")
    path = write(tmp_path, GOOD.replace("base: tiny-qwen3.5", "base: tiny-qwen3.5\n  chat_template: t.jinja"))
    result = run_ft("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "do not each end with an end-of-turn token" in result.stderr
    assert "model.chat_template" not in result.stderr or "t.jinja" in result.stderr


def test_custom_template_without_generation_markers_is_refused(tmp_path):
    from finetune.models import QWEN3_5

    (tmp_path / "t.jinja").write_text(QWEN3_5.read_template(), encoding="utf-8")
    path = write(tmp_path, GOOD.replace("base: tiny-qwen3.5", "base: tiny-qwen3.5\n  chat_template: t.jinja"))
    result = run_ft("validate", str(path))
    assert result.returncode == 2
    assert "no {% generation %}" in result.stderr and "t.jinja" in result.stderr


def test_override_inside_a_map_keeps_the_rest_of_the_key_whole():
    """`--set eval.require.json.category.accuracy=0.5` gates the metric `json.category.accuracy`:
    inside a map (eval.require) the rest of the dotted key is one key, not more sections."""
    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml",
                         ["eval.require.json.category.accuracy=0.5", "eval.require.general.leakage=-0.02",
                          "eval.general.max_prompts=8"])
    assert recipe.eval.require == {"json.category.accuracy": 0.5, "general.leakage": -0.02}
    assert recipe.eval.general.max_prompts == 8
