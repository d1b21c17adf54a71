"""`ft validate RECIPE --show N`: the rows the model is trained on, as the model sees them.

Mask and template mistakes are what the loss curve hides (every label -100, an end-of-turn token
never trained, a think block in the wrong place); Axolotl's `preprocess --debug` prints masked
samples for that reason. Each row here is what `ft train` feeds TRL, made by the same renderer and
the same truncation: the trained tokens are marked (green on a terminal, between [[ and ]] when
piped or NO_COLOR is set), special tokens are shown as the tokens they are, and each row says its
token count, trained-token count and whether data.max_length cut it. `--split heldout` shows the
served prompt `ft eval` generates from (and the exported GGUF's template renders), followed by the
reference answer as it is scored. `--tokens` lists every token: position, id, text, trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from finetune import render
from finetune.loading import Prepared
from finetune.recipe import Recipe

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # the plain marker, when colour cannot show it
TRAINED_STYLE, SPECIAL_STYLE = "bold green", "cyan"


@dataclass
class ShownRow:
    where: str
    input_ids: list[int]
    labels: list[int]
    fate: str  # "kept", "truncated (N prompt tokens cut)", "dropped: ..." or "refused: ..."
    part: str = ""  # "row 2 of 3" when an example trains as several rows

    @property
    def trained(self) -> int:
        return sum(label != -100 for label in self.labels)


def training_rows(prep: Prepared, recipe: Recipe, count: int) -> list[ShownRow]:
    """The first `count` rows of the training split, each as `ft train` would feed it."""
    shown: list[ShownRow] = []
    bos = prep.tokenizer.bos_token_id
    for example in prep.splits.train:
        rows = prep.renderer.rows(example)
        for k, row in enumerate(rows):
            part = f"row {k + 1} of {len(rows)}" if len(rows) > 1 else ""
            shown.append(fitted(row, recipe, bos, part))
            if len(shown) == count:
                return shown
    return shown


def fitted(row: render.Row, recipe: Recipe, bos: int | None, part: str) -> ShownRow:
    """The row after data.max_length and data.too_long (render.apply_too_long, as training applies it)."""
    length, limit = len(row.input_ids), recipe.data.max_length
    taken, fate = render.apply_too_long(row, limit, recipe.data.too_long, bos)
    over = f"{length} tokens > data.max_length {limit}"
    said = {"kept": "kept", "refused": f"refused: {over} (data.too_long: error)", "dropped": f"dropped: {over}",
            "truncated": f"truncated ({length - len(taken.input_ids) if taken else 0} prompt tokens cut)"}[fate]
    shown = taken or row  # a refused or dropped row is shown whole
    return ShownRow(shown.where, shown.input_ids, shown.labels, said, part)


@dataclass
class SplitSummary:
    """The whole training split as `ft train` will see it (render.tokenize_all's report, and what
    it would refuse)."""

    examples: int
    rows: int  # kept and truncated rows: what trains
    tokens: int
    trained: int
    truncated: int
    dropped: int
    refused: int  # over data.max_length with data.too_long: error (ft train stops at the first)
    untrained: int  # rows with no trained token (a template that masks everything)

    def line(self) -> str:
        share = f" ({self.trained / self.tokens:.0%})" if self.tokens else ""
        return (f"training split: {self.examples} examples → {self.rows} rows, {self.tokens:,} tokens, "
                f"{self.trained:,} trained{share}; {self.truncated} truncated, {self.dropped} dropped, "
                f"{self.refused} over data.max_length and refused, {self.untrained} with nothing trained")


def summarize(prep: Prepared, recipe: Recipe) -> SplitSummary:
    bos = prep.tokenizer.bos_token_id
    shown = [fitted(row, recipe, bos, "") for e in prep.splits.train for row in prep.renderer.rows(e)]
    training = [r for r in shown if r.fate == "kept" or r.fate.startswith("truncated")]
    return SplitSummary(len(prep.splits.train), len(training), sum(len(r.input_ids) for r in training),
                        sum(r.trained for r in training), sum(r.fate.startswith("truncated") for r in shown),
                        sum(r.fate.startswith("dropped") for r in shown), sum(r.fate.startswith("refused") for r in shown),
                        sum(r.trained == 0 for r in training))


def heldout_rows(prep: Prepared, count: int) -> list[ShownRow]:
    """Held-out examples as `ft eval` uses them: the served prompt (generation prompt included),
    then the reference answer, whose tokens are the ones scored for loss."""
    shown = []
    for example in prep.splits.heldout[:count]:
        prompt, row = prep.renderer.final_turn(example)
        fate = "served prompt + reference" if row.input_ids[:len(prompt)] == prompt else "prompt differs from row"
        shown.append(ShownRow(example.where, row.input_ids, row.labels, fate))
    return shown


def segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool, bool]]:
    """(text, trained, special) runs: consecutive tokens of one kind decoded together, so a
    character split across tokens reads whole; every special token is a run of its own."""
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    runs: list[tuple[str, bool, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        boundary = (i == len(ids) or (labels[i] != -100) != (labels[start] != -100)
                    or ids[i] in special_ids or ids[i - 1] in special_ids)
        if boundary:
            piece = ids[start:i]
            special = len(piece) == 1 and piece[0] in special_ids
            text = tokenizer.convert_ids_to_tokens(piece[0]) if special else tokenizer.decode(piece)
            runs.append((text, labels[start] != -100, special))
            start = i
    return runs


def as_text(runs: list[tuple[str, bool, bool]], markers: bool) -> Text:
    """One row as rich Text: colour on a terminal; with `markers`, trained runs between [[ ]]
    (adjacent trained runs share one pair) and no styles."""
    text = Text()
    open_span = False
    for piece, trained, special in runs:
        if markers:
            if trained and not open_span:
                text.append(TRAINED_OPEN)
            elif not trained and open_span:
                text.append(TRAINED_CLOSE)
            open_span = trained
            text.append(piece)
        else:
            style = " ".join(s for s, on in ((TRAINED_STYLE, trained), (SPECIAL_STYLE, special)) if on)
            text.append(piece, style=style or None)
    if markers and open_span:
        text.append(TRAINED_CLOSE)
    return text


def token_lines(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """One line per token: position, id, the token as the vocabulary spells it, trained or not."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [f"{i:>6} {token_id:>8} {'T' if label != -100 else '.'} {token!r}"
            for i, (token_id, token, label) in enumerate(zip(ids, tokens, labels))]


def header(row: ShownRow, index: int, end_of_turn: tuple[str, ...], tokenizer) -> str:
    last = max((i for i, label in enumerate(row.labels) if label != -100), default=None)
    ends = tokenizer.convert_ids_to_tokens(row.input_ids[last]) if last is not None else None
    stop = "no trained tokens" if last is None else (
        f"trained text ends with {ends}" + ("" if ends in end_of_turn else " (not an end-of-turn token)"))
    part = f" {row.part}" if row.part else ""
    return (f"── {index} · {row.where}{part} · {len(row.input_ids)} tokens · {row.trained} trained · {row.fate} · "
            f"{stop}")


def describe(prep: Prepared, recipe: Recipe, split: str) -> list[str]:
    """What the rows were made with: templates, switches, the end-of-turn tokens, the marker."""
    kwargs = ", ".join(f"{k}={v}" for k, v in prep.template_kwargs.items()) or "none"
    what = "training rows" if split == "train" else "held-out examples (served prompt, then the scored reference)"
    return [f"{what}; training template {prep.renderer.template_where}; template switches: {kwargs}; "
            f"end of turn: {' '.join(prep.base.family.end_of_turn)}; data.max_length {recipe.data.max_length} "
            f"(too_long: {recipe.data.too_long})"]
