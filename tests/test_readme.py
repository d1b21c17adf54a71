"""The README is the user's manual: its recipe-key table must match the schema exactly."""

from __future__ import annotations

import re

from finetune.recipe import keys_markdown, recipe_keys
from tests.conftest import ROOT


def test_readme_documents_every_recipe_key():
    """On failure, paste the output of `python -c "from finetune.recipe import keys_markdown;
    print(keys_markdown())"` between the recipe-keys markers."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("<!-- recipe-keys:start -->")[1].split("<!-- recipe-keys:end -->")[0]
    documented = re.findall(r"^\| `([a-z0-9_.]+)` \|", table, flags=re.M)
    assert documented == [row[0] for row in recipe_keys()]
    assert table.strip() == keys_markdown()
    broken = [row for row in keys_markdown().splitlines() if row.count("|") != 5]
    assert not broken, f"a type or meaning holds a '|', which splits the markdown row: {broken}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci and "python -m pytest -q" in readme
