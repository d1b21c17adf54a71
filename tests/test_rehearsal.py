"""train.rehearsal (eval/rehearsal.py, finetune/render.mixed_with): the base's own answers to
general prompts, mixed into training.

Checked: the rows reach TRL's trainer with their labels (the base's exact answer tokens, the
prompt masked), in the share asked; the answers are the base's (generated with the adapter off,
equal to a fresh greedy generation of the base) and cached; the rehearsed prompts are never the
ones the general section measures; `ft validate --show` shows rehearsal rows as what they are;
a recipe that leaves rehearsal no prompts is refused before training. Not exercised here: the
unsloth backend's generation (CUDA only).
"""

from __future__ import annotations

import pytest

from eval import general as G
from eval import rehearsal as R
from finetune import render
from finetune.recipe import load_recipe
from tests.conftest import ROOT, run_ft

RECIPE = ROOT / "recipes" / "tiny-support.yaml"


def test_rehearsal_never_trains_on_what_the_general_section_measures():
    recipe = load_recipe(RECIPE, ["train.rehearsal=0.2", "train.rehearsal_prompts=50"])
    asked = {p.where for p in G.general_prompts(recipe)}
    rehearsed = G.rehearsal_prompts(recipe)
    assert len(rehearsed) == 50 and not asked & {p.where for p in rehearsed}
    assert rehearsed[0].where == G.whole_prompt_set(recipe)[recipe.eval.general.max_prompts].where


def test_mixing_adds_the_share_asked_and_keeps_labels():
    import datasets

    job = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 30, "labels": [[-100, 2, 3]] * 30})
    rows = [render.Row([5, 6, 7 + k], [-100, 6, 7 + k], f"r{k}") for k in range(4)]
    mixed, count = render.mixed_with(job, rows, 0.25)
    assert count == 10 and len(mixed) == 40  # 10 of 40 rows: a quarter
    assert mixed[30]["labels"] == [-100, 6, 7] and mixed[33]["input_ids"] == [5, 6, 10] and mixed[34]["labels"] == [-100, 6, 7]
    assert render.mixed_with(job, [], 0.25)[1] == 0


def test_a_recipe_that_leaves_rehearsal_no_prompts_is_refused_before_training():
    result = run_ft("validate", str(RECIPE), "--set", "train.rehearsal=0.1", "--set", "eval.general.max_prompts=null")
    assert result.returncode == 2, result.stderr
    assert "train.rehearsal" in result.stderr and "max_prompts" in result.stderr and "Traceback" not in result.stderr


def test_rehearsal_rows_reach_the_trainer_with_the_base_answers_as_labels(tmp_path, monkeypatch, qwen_twin):
    """A real (short) training run on the twin: the dataset TRL's trainer receives holds the job's
    rows and, after them, the rehearsal rows: prompt masked, the base's greedy answer trained. The
    answer equals a fresh greedy generation of the base; a second run reads it from the cache."""
    from finetune import cli
    from finetune.run import RunDir
    from finetune.train import runner, trainer

    monkeypatch.setenv("FT_CACHE", str(tmp_path / "cache"))
    seen = []
    real = trainer.make_trainer

    def capture(model, args, prep, train_ds, heldout_ds, callbacks, *rest):
        made = real(model, args, prep, train_ds, heldout_ds, callbacks, *rest)
        seen.append((made.train_dataset, prep, model))  # what TRL kept, after its own preparation
        return made

    monkeypatch.setattr(trainer, "make_trainer", capture)
    recipe = load_recipe(RECIPE, ["data.limit=24", "train.max_steps=2", "train.rehearsal=0.25",
                                  "train.rehearsal_prompts=4", "eval.general.max_new_tokens=12", "eval.after_train=false"])
    run = RunDir(tmp_path / "run")
    runner.train(recipe, run, rehearsal=cli._rehearsal_rows)
    dataset, prep, model = seen[0]
    jobs = len(prep.splits.train)
    assert len(dataset) == jobs + render.rehearsal_row_count(jobs, 0.25)
    items = G.prompt_items(G.rehearsal_prompts(recipe), prep.renderer)
    for k, item in enumerate(items):
        row, prompt = dataset[jobs + k], item.prompt_ids
        assert row["input_ids"][: len(prompt)] == prompt and set(row["labels"][: len(prompt)]) == {-100}
        answer = row["labels"][len(prompt):]
        assert answer and -100 not in answer and answer == row["input_ids"][len(prompt):]
    # the answer is the base's own greedy one: generate it again from a freshly loaded base (the
    # longest prompt: the one row of the batch without left padding)
    longest = max(range(len(items)), key=lambda k: len(items[k].prompt_ids))
    prompt = items[longest].prompt_ids
    answer = dataset[jobs + longest]["labels"][len(prompt):]
    assert answer == greedy_base_answer(recipe, prep, prompt, 12)[: len(answer)]
    first = dataset[jobs]
    manifest = run.read_manifest()
    assert manifest.rehearsal.rows == render.rehearsal_row_count(jobs, 0.25) and not manifest.rehearsal.cached
    runner.train(recipe, RunDir(tmp_path / "again"), rehearsal=cli._rehearsal_rows)
    assert RunDir(tmp_path / "again").read_manifest().rehearsal.cached
    assert seen[1][0][jobs]["input_ids"] == first["input_ids"]


def greedy_base_answer(recipe, prep, prompt_ids: list[int], budget: int) -> list[int]:
    import torch

    from finetune.loading import load_base_model

    base = load_base_model(recipe, prep.base).eval()
    eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
    with torch.no_grad():
        out = base.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=budget,
                            eos_token_id=eot, pad_token_id=prep.tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_validate_show_marks_rehearsal_rows_as_what_they_are():
    result = run_ft("validate", str(RECIPE), "--set", "train.rehearsal=0.5", "--show", "2")
    assert result.returncode == 0, result.stderr
    assert "train.rehearsal 0.5: rows of the base's own answers" in result.stdout
    assert "rehearsal: the base's answer to" in result.stdout and "general_prompts.jsonl:25" in result.stdout



def test_auto_rehearses_where_the_base_can_answer_before_training(monkeypatch):
    """auto: 1/16 of the rows on the hf backend in one process or under ddp; off, saying why,
    under fsdp / deepspeed (the base is not on one device before the strategy places it) and on
    unsloth; an explicit share under sharding is refused with the fix; 0 is off; auto with no
    prompts left says so instead of refusing."""
    from finetune.errors import UserError
    from finetune.recipe import AUTO_REHEARSAL
    from finetune.train.plan import rehearsal_share

    assert rehearsal_share(load_recipe(RECIPE), "hf") == (AUTO_REHEARSAL, None)
    assert rehearsal_share(load_recipe(RECIPE), "unsloth")[0] == 0.0
    assert rehearsal_share(load_recipe(RECIPE, ["train.rehearsal=0"]), "hf") == (0.0, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    share, why = rehearsal_share(load_recipe(RECIPE, ["distributed.strategy=fsdp"]), "hf")
    assert share == 0.0 and "off under distributed.strategy fsdp" in why
    assert rehearsal_share(load_recipe(RECIPE, ["distributed.strategy=ddp"]), "hf")[0] == AUTO_REHEARSAL
    with pytest.raises(UserError, match="cannot run under distributed.strategy deepspeed"):
        rehearsal_share(load_recipe(RECIPE, ["distributed.strategy=deepspeed", "train.rehearsal=0.1"]), "hf")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert R.check(load_recipe(RECIPE, ["train.rehearsal=0"]), None) is None
    note = R.check(load_recipe(RECIPE, ["eval.general.max_prompts=null"]), None)
    assert note.startswith("train.rehearsal auto: off")
