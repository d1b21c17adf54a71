"""`ft validate --show`: what it prints is what training feeds, on every family's template.

References: the rows `ft train` tokenizes (render.tokenize_all, the dataset TRL receives) and, for
held-out examples, the tokenizer's own `apply_chat_template` with the served template. The marked
text is checked against the labels token for token. Not exercised here: hub tokenizers (the
families' real vocabularies); the twins and SmolLM2 carry their families' templates and special
tokens, which is what the marking depends on."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from finetune import render
from finetune import show as show_mod
from finetune.loading import prepare
from finetune.recipe import load_recipe
from tests.conftest import ROOT, run_ft

TINY = ROOT / "recipes" / "tiny-support.yaml"
FAMILIES = [  # (base, overrides): every family, Qwen3.5 in both thinking modes
    ("tiny-qwen3.5", ["model.thinking=false"]),
    ("tiny-qwen3.5", ["model.thinking=true"]),
    ("tiny-olmo3", []),
    ("smollm2-135m", []),
]


def prepared(base: str, overrides: list[str], extra: tuple[str, ...] = ()):
    recipe = load_recipe(TINY, [f"model.base={base}", *overrides, *extra])
    return recipe, prepare(recipe)


def unmark(text: str) -> tuple[str, list[str]]:
    """(the text without markers, the marked spans)."""
    spans = re.findall(re.escape(show_mod.TRAINED_OPEN) + r"(.*?)" + re.escape(show_mod.TRAINED_CLOSE), text, re.S)
    return text.replace(show_mod.TRAINED_OPEN, "").replace(show_mod.TRAINED_CLOSE, ""), spans


def label_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


@pytest.mark.parametrize("base,overrides", FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_shown_rows_are_the_trained_rows(base, overrides, qwen_twin, olmo_twin, smollm2_base):
    recipe, prep = prepared(base, overrides)
    shown = show_mod.training_rows(prep, recipe, 4)
    dataset, _ = render.tokenize_all(prep.renderer, prep.splits.train[:4], recipe.data.max_length,
                                     recipe.data.too_long)
    assert [r.input_ids for r in shown] == dataset["input_ids"]  # what TRL receives, row for row
    assert [r.labels for r in shown] == dataset["labels"]
    eot = prep.base.family.end_of_turn
    for index, row in enumerate(shown, 1):
        runs = show_mod.segments(prep.tokenizer, row.input_ids, row.labels)
        plain = show_mod.as_text(runs, markers=True).plain
        text, spans = unmark(plain)
        assert text == prep.tokenizer.decode(row.input_ids)  # nothing added or lost but the markers
        assert spans == label_spans(prep.tokenizer, row.input_ids, row.labels)  # marked == trained
        assert spans and spans[-1].endswith(eot)
        head = show_mod.header(row, index, eot, prep.tokenizer)
        assert f"{len(row.input_ids)} tokens · {row.trained} trained · kept" in head
        assert "trained text ends with " in head and "not an end-of-turn" not in head
        specials = [piece for piece, _, special in runs if special]
        assert any(token in specials for token in eot)  # shown as the token it is, styled apart
        assert all(prep.tokenizer.convert_tokens_to_ids(s) in prep.tokenizer.all_special_ids
                   or prep.tokenizer.added_tokens_decoder[prep.tokenizer.convert_tokens_to_ids(s)].special
                   for s in specials)
    if "model.thinking=true" in overrides:  # the empty think block the answer opens with is trained
        assert "</think>" in unmark(show_mod.as_text(show_mod.segments(
            prep.tokenizer, shown[0].input_ids, shown[0].labels), markers=True).plain)[1][0]
    elif prep.base.family.name == "qwen3_5":  # thinking off: the closed think block is prompt, not trained
        assert "</think>" not in unmark(show_mod.as_text(show_mod.segments(
            prep.tokenizer, shown[0].input_ids, shown[0].labels), markers=True).plain)[1][0]


@pytest.mark.parametrize("base,overrides", FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_heldout_shows_the_served_prompt(base, overrides, qwen_twin, olmo_twin, smollm2_base):
    """The held-out view's prompt is the official template's generation prompt, rendered here by
    the tokenizer's apply_chat_template (the reference), and its marked part is the reference answer."""
    recipe, prep = prepared(base, overrides)
    rows = show_mod.heldout_rows(prep, 3)
    for example, row in zip(prep.splits.heldout, rows):
        served = prep.tokenizer.apply_chat_template(
            example.messages[:-1], chat_template=prep.base.family.read_template(), add_generation_prompt=True,
            tokenize=False, **prep.template_kwargs)
        text, spans = unmark(show_mod.as_text(show_mod.segments(prep.tokenizer, row.input_ids, row.labels),
                                              markers=True).plain)
        assert text.startswith(served)
        assert spans[0].startswith(example.messages[-1]["content"].strip()[:20]) or "</think>" in spans[0]
        assert row.fate == "served prompt + reference"


def test_the_split_summary_is_what_training_reports(qwen_twin):
    recipe, prep = prepared("tiny-qwen3.5", [], ("data.max_length=128", "data.too_long=truncate", "data.limit=60"))
    summary = show_mod.summarize(prep, recipe)
    _, report = render.tokenize_all(prep.renderer, prep.splits.train, 128, "truncate")
    assert (summary.rows, summary.tokens, summary.trained, summary.truncated, summary.dropped) == (
        report["rows"], report["tokens"], report["trained_tokens"], report["truncated"], report["dropped"])
    assert summary.truncated > 0 and summary.untrained == 0 and summary.refused == 0
    recipe.data.too_long = "error"
    assert show_mod.summarize(prep, recipe).refused == summary.truncated + summary.dropped


def test_truncated_and_refused_rows_say_so(qwen_twin):
    recipe, prep = prepared("tiny-qwen3.5", [], ("data.max_length=64", "data.too_long=truncate"))
    row = show_mod.training_rows(prep, recipe, 1)[0]
    assert len(row.input_ids) == 64 and row.fate.startswith("truncated (") and row.trained > 0
    recipe.data.too_long = "error"
    assert show_mod.training_rows(prep, recipe, 1)[0].fate.startswith("refused: ")
    recipe.data.too_long = "drop"
    assert show_mod.training_rows(prep, recipe, 1)[0].fate.startswith("dropped: ")


def test_colour_on_a_terminal_markers_through_a_pipe(qwen_twin):
    """Through a pipe (the CLI's stdout here), [[ ]] and no escape codes; on a terminal, the trained
    text in green and no markers."""
    result = run_ft("validate", str(TINY), "--show", "2")
    assert result.returncode == 0, result.stderr
    # two job rows, then the rehearsal row (train.rehearsal auto): its share of 2, at least one
    assert "\x1b[" not in result.stdout and result.stdout.count("── ") == 3
    assert result.stdout.index("rehearsal: the base's answer to") > result.stdout.index("── 2 · ")
    assert result.stdout.count(show_mod.TRAINED_OPEN) >= 2 and "<|im_end|>" + show_mod.TRAINED_CLOSE in result.stdout
    assert re.search(r"── 1 · \S+train\.jsonl:\d+ · \d+ tokens · \d+ trained · kept", result.stdout)
    assert re.search(r"training split: 800 examples → 800 rows, [\d,]+ tokens, [\d,]+ trained \(\d+%\)", result.stdout)
    tokens = run_ft("validate", str(TINY), "--show", "1", "--tokens")
    assert re.search(r"\d+\s+\d+ T '<\|im_end\|>'", tokens.stdout), tokens.stdout[-500:]

    recipe, prep = prepared("tiny-qwen3.5", [])
    row = show_mod.training_rows(prep, recipe, 1)[0]
    terminal = Console(force_terminal=True, color_system="standard", width=200, record=False)
    with terminal.capture() as captured:
        terminal.print(show_mod.as_text(show_mod.segments(prep.tokenizer, row.input_ids, row.labels), markers=False))
    ansi = captured.get()
    assert show_mod.TRAINED_OPEN not in ansi
    assert "\x1b[1;32m" in ansi  # bold green: the trained answer
    green = "".join(re.findall(r"\x1b\[1;32m(.*?)\x1b\[0m", ansi, re.S))
    assert '"category"' in green and "<|im_start|>" not in green


def test_show_refuses_an_unknown_split(qwen_twin):
    result = run_ft("validate", str(TINY), "--show", "1", "--split", "valid")
    assert result.returncode == 2 and "--split" in result.stderr and "Traceback" not in result.stderr
