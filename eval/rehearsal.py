"""train.rehearsal: the base's own answers to general prompts, mixed into the training rows.

A narrow SFT pulls every answer toward the job's format (issue: asked the capital of France, the
support-ticket fine-tune answers `{"capital": "Paris"}`). Self-synthesised rehearsal (Huang et al.,
ACL 2024) keeps general behaviour without a general dataset: the base answers general prompts once,
greedily, and those answers train beside the job's rows, so the adapter learns "answer tickets in
JSON" without learning "answer everything in JSON".

- The prompts are ft's general set after the ones the general section asks (train.rehearsal_prompts):
  drift measured on answers the adapter was trained to give would flatter it.
- Each prompt is served as the general section serves it: one user message, no system message
  (the job's rows carry the job's system prompt, so the two stay apart).
- The rows are token ids, not re-rendered text: the base's exact tokens are the labels, and an
  answer cut by the budget trains without an end-of-turn token (the base did not stop there).
- The answers depend only on the base, the prompts and the budget: cached as the general
  section's are (`$FT_CACHE/eval/`), so a second run (or a resumed one) trains on the same rows.

Lives in eval (it needs eval's generation and prompt set); the CLI hands it to `ft train`, which
cannot import eval.
"""

from __future__ import annotations

from dataclasses import asdict

from eval.base_cache import read_cached, store
from eval.columns import Generation, TransformersColumn
from eval.general import base_answers_key, prompt_items, rehearsal_prompts
from finetune.data import Splits
from finetune.errors import UserError
from finetune.loading import Prepared
from finetune.recipe import AUTO_REHEARSAL, Recipe
from finetune.render import Row, rehearsal_row_count

CACHE_KIND = "rehearsal-base"


def check(recipe: Recipe, splits: Splits) -> str | None:
    """Before any weights load: rehearsal needs prompts the general section does not ask. An
    explicit share without them is refused; auto says it has none and trains without."""
    chosen = recipe.train.rehearsal
    if not chosen:
        return None
    share = AUTO_REHEARSAL if chosen == "auto" else chosen
    prompts = rehearsal_prompts(recipe)
    if not prompts:
        if chosen == "auto":
            return "train.rehearsal auto: off (eval.general.max_prompts asks every general prompt)"
        raise UserError("train.rehearsal has no general prompts to rehearse: eval.general.max_prompts asks "
                        "every one", "train.rehearsal",
                        "set eval.general.max_prompts below the set's size, add prompts with "
                        "eval.general.prompts, or set train.rehearsal to 0")
    return (f"train.rehearsal {chosen if chosen == 'auto' else format(chosen, 'g')}: the base's own answers to "
            f"{len(prompts)} general prompts ({prompts[0].where} on), about "
            f"{rehearsal_row_count(len(splits.train), share)} rows")


def cached_answers(recipe: Recipe, prep: Prepared, base_identity: list) -> tuple[list, str, list[Generation] | None]:
    items = prompt_items(rehearsal_prompts(recipe), prep.renderer)
    key = base_answers_key(base_identity, recipe, items)
    rows = read_cached(CACHE_KIND, key)
    return items, key, [Generation(**a) for a in rows] if rows is not None else None


def as_rows(recipe: Recipe, items, answers: list[Generation]) -> list[Row]:
    """Prompt then the base's answer tokens, only the answer trained; longer than data.max_length: left out."""
    rows = []
    for item, answer in zip(items, answers):
        row = Row(item.prompt_ids + answer.tokens, [-100] * len(item.prompt_ids) + answer.tokens,
                  f"rehearsal: the base's answer to {item.where}")
        if answer.tokens and len(row.input_ids) <= recipe.data.max_length:
            rows.append(row)
    return rows


def rehearsal_rows(recipe: Recipe, model, prep: Prepared, base_identity: list,
                   progress=lambda line: None) -> tuple[list[Row], bool]:
    """The rows, and whether the base's answers came from the cache. `model`: the peft model
    about to train (its adapter is switched off here, so this is the base training starts from)."""
    items, key, answers = cached_answers(recipe, prep, base_identity)
    cached = answers is not None
    if answers is None:
        progress(f"rehearsal: the base answers {len(items)} general prompts (cached for later runs)")
        eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
        column = TransformersColumn("base", model, prep.tokenizer, eot, recipe.eval.batch_size,
                                    recipe.eval.general.max_new_tokens, adapter=False)
        was_training = model.training
        model.eval()
        try:
            answers = column.generate(items)
        finally:
            model.train(was_training)
        store(CACHE_KIND, key, [asdict(a) for a in answers])
    return as_rows(recipe, items, answers), cached


def shown_rows(recipe: Recipe, prep: Prepared, count: int, base_identity: list):
    """`ft validate --show`'s rehearsal rows, as training takes them: with the base's cached answer
    (trained tokens marked), or, before the first run has generated it, the served prompt alone."""
    from finetune.show import ShownRow

    items, _, answers = cached_answers(recipe, prep, base_identity)
    if answers is not None:
        return [ShownRow(r.where, r.input_ids, r.labels, "rehearsal row (the base's answer, cached)")
                for r in as_rows(recipe, items, answers)[:count]]
    return [ShownRow(f"rehearsal: the base's answer to {i.where}", i.prompt_ids, [-100] * len(i.prompt_ids),
                     "rehearsal row: served prompt only; the base's answer is generated when ft train starts")
            for i in items[:count]]
