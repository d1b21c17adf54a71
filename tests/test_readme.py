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


def test_readme_states_the_verification_bounds_the_code_holds():
    """Every bound the README gives for `ft export`'s verification is export/verify.py's."""
    from export.verify import BOUNDS, DECISIVE_MARGIN

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    step = readme.split("6. **Verification**")[1].split("Output, `runs/<name>/export/`")[0]
    said = " ".join(step.split())
    assert f"top-1 ≥ {BOUNDS.sixteen_bit.top1_min} and mean KL < {BOUNDS.sixteen_bit.kl_max:.0e}".replace("e-03", "e-3") in said
    assert f"top-1 ≥ {BOUNDS.quantized.top1_decisive_min} on *decisive* positions" in said
    assert f"leads the runner-up by at least {DECISIVE_MARGIN} in probability" in said
    assert f"mean KL ≤ {BOUNDS.quantized.kl_max:g} nat" in said
    assert f"at most {round(BOUNDS.stop_rate_drop_max * 100)} points fewer" in said
