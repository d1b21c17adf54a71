"""Render: conversations → token rows whose labels are the assistant's text only.

Labels are computed by the chat template itself: the family's *training* template marks the text
a model must learn to produce with `{% generation %}`, and transformers returns that as a mask.
The marked span ends with the end-of-turn token, so the model learns to stop; `check_template`
proves it on every run before a single step is taken. The trained tokens are exactly what follows
the *served* generation prompt (what Ollama and `ft eval` send), in both thinking modes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.data import Example
from finetune.errors import UserError
from finetune.models import Family
from finetune.recipe import Recipe


def template_kwargs(family: Family, recipe: Recipe) -> dict:
    return {"enable_thinking": recipe.model.thinking} if "enable_thinking" in family.template_switches else {}


@dataclass
class Row:
    """One training sequence: token ids, labels (-100 where nothing is learned)."""

    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class Renderer:
    """Turns a conversation into token rows whose trained tokens are exactly what the model must
    produce after the *served* generation prompt (the official template's, which Ollama and the
    GGUF use), for every assistant turn.

    Why not one `apply_chat_template(..., return_assistant_tokens_mask=True)` call: the rendered
    history of a multi-turn conversation is not always what was served when that turn was
    generated (Qwen3.5 drops the think block from earlier turns), and tokenizing prompt and answer
    as one string lets BPE merge across the boundary (`<think>\n` + `\n</think>` → one `\n\n`
    token the model never sees after a served prompt). So the prompt is tokenized on its own, as
    served, and the answer after it."""

    tokenizer: object
    template: str  # training template: {% generation %} marks the trained text
    served: str  # the template the model is served with (the generation prompt comes from here)
    kwargs: dict  # template switches (enable_thinking)
    template_where: str = "chat template"

    def _render(self, messages: list[dict], template: str, generation_prompt: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template

        marked = template is self.template  # the served template has no {% generation %} marks
        rendered, spans = render_jinja_template(
            [messages], chat_template=template, add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=marked, **self.tokenizer.special_tokens_map, **self.kwargs)
        return rendered[0], spans[0] if marked else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def served_prompt(self, messages: list[dict]) -> str:
        return self._render(messages, self.served, generation_prompt=True)[0]

    def served_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The served prompt's token ids: what a model is asked, in ft eval, ft chat and the GGUF."""
        return self._ids(self.served_prompt(messages))

    def rows(self, example: Example) -> list[Row]:
        """The example as one row with every assistant turn labelled when its rendered history is
        token-for-token what was served before each turn; otherwise one row per assistant turn."""
        self._check_thinking(example)
        try:
            text, spans = self._render(example.messages, self.template)
            turns = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
            prompts = [self.served_prompt(example.messages[:i]) for i in turns]
        except Exception as exc:  # the template raised (e.g. a role it does not allow)
            raise UserError(f"the chat template rejected this conversation: {exc}", example.where,
                            "check the roles and order of its messages") from None
        if len(spans) != len(turns):
            raise UserError(f"the {self.template_where} marks {len(spans)} trained spans in a conversation with "
                            f"{len(turns)} assistant turns", example.where,
                            "wrap each assistant turn in one {% generation %} block")
        if all(text[:start] == prompt for (start, _), prompt in zip(spans, prompts)):
            ids, labels, at = [], [], 0
            for start, end in spans:
                ids += self._ids(text[at:start])
                labels += [-100] * (len(ids) - len(labels))
                answer = self._ids(text[start:end])
                ids += answer
                labels += answer
                at = end
            # the history before each turn must also be the served prompt token for token
            if all(ids[:labels_start] == self._ids(p)
                   for labels_start, p in zip(_span_starts(labels), prompts)):
                return [Row(ids, labels, example.where)]
        return [self._turn_row(example, i, prompt) for i, prompt in zip(turns, prompts)]

    def _turn_row(self, example: Example, turn: int, prompt: str) -> Row:
        text, spans = self._render(example.messages[:turn + 1], self.template)
        start, end = spans[-1]
        if text[:start] != prompt:
            at = next((k for k, (a, b) in enumerate(zip(text, prompt)) if a != b), min(len(text), len(prompt)))
            raise UserError(
                f"the {self.template_where} trains a different prefix than the served generation prompt: "
                f"trained text starts after {text[max(0, at - 30):start]!r}, the served prompt ends "
                f"{prompt[max(0, at - 30):]!r}", example.where,
                "make the training template's text before {% generation %} equal the official template's "
                "generation prompt")
        prompt_ids, answer = self._ids(prompt), self._ids(text[start:end])
        return Row(prompt_ids + answer, [-100] * len(prompt_ids) + answer, example.where)

    def final_turn(self, example: Example) -> tuple[list[int], Row]:
        """(served prompt ids, row whose labels are the last assistant turn only): what `ft eval`
        generates from and scores."""
        self._check_thinking(example)
        prompt = self.served_prompt(example.messages[:-1])
        return self._ids(prompt), self._turn_row(example, len(example.messages) - 1, prompt)

    def _check_thinking(self, example: Example) -> None:
        if self.kwargs.get("enable_thinking") is not False:
            return
        for i, m in enumerate(example.messages):
            if m["role"] == "assistant" and ("<think>" in m["content"] or "</think>" in m["content"]):
                raise UserError(
                    f"message {i} has reasoning (<think>...</think>) but model.thinking is false: the served "
                    "prompt closes the think block, so the model would learn reasoning it is never asked for",
                    example.where, "set model.thinking: true to train reasoning, or remove the think block")


def _span_starts(labels: list[int]) -> list[int]:
    return [i for i, lab in enumerate(labels) if lab != -100 and (i == 0 or labels[i - 1] == -100)]


def fit(row: Row, max_length: int, keep_first: int | None = None) -> Row | None:
    """Truncate a row over max_length by cutting the *start* of its prompt, so the answer and its
    end-of-turn token are kept (a model trained on cut answers never learns to stop). None when
    the last answer alone does not fit. `keep_first`: a BOS id that stays at position 0."""
    if len(row.input_ids) <= max_length:
        return row
    last_answer = _span_starts(row.labels)[-1]
    keep = 1 if keep_first is not None and row.input_ids[0] == keep_first else 0
    if len(row.input_ids) - last_answer > max_length - keep:
        return None
    cut = len(row.input_ids) - (max_length - keep)
    ids = row.input_ids[:keep] + row.input_ids[cut:]
    labels = row.labels[:keep] + row.labels[cut:]
    # an earlier answer cut at its start would be learned without its question: not learned
    for i in range(keep, len(labels)):
        if labels[i] == -100:
            break
        labels[i] = -100
    return Row(ids, labels, row.where)


def apply_too_long(row: Row, max_length: int, too_long: str, bos: int | None) -> tuple[Row | None, str]:
    """(the row as training takes it, or None; what happened: kept, truncated, dropped, or refused
    when data.too_long is error). One rule for `ft train` and `ft validate --show`."""
    if len(row.input_ids) <= max_length:
        return row, "kept"
    if too_long == "error":
        return None, "refused"
    cut = fit(row, max_length, bos) if too_long == "truncate" else None
    return cut, "truncated" if cut is not None else "dropped"


def tokenize_all(renderer: Renderer, examples: list[Example], max_length: int, too_long: str = "truncate"):
    """A datasets.Dataset of input_ids/labels and a report of what was cut or left out.
    too_long: error (refuse, naming the first long row), truncate (cut the prompt's start; rows
    whose answer alone is too long are dropped and counted), or drop (leave long rows out)."""
    import datasets

    rows, truncated, dropped = [], [], []
    bos = renderer.tokenizer.bos_token_id
    for e in examples:
        for row in renderer.rows(e):
            taken, fate = apply_too_long(row, max_length, too_long, bos)
            if fate == "refused":
                raise UserError(f"this example is {len(row.input_ids)} tokens, longer than data.max_length "
                                f"({max_length})", e.where,
                                "raise data.max_length, shorten the example, or set data.too_long to "
                                "truncate or drop")
            if fate == "truncated":
                truncated.append(e.where)
            elif fate == "dropped":
                dropped.append(e.where)
            if taken is not None:
                rows.append(taken)
    report = {"examples": len(examples), "rows": len(rows), "truncated": len(truncated), "dropped": len(dropped),
              "truncated_where": truncated[:5], "dropped_where": dropped[:5],
              "tokens": sum(len(r.input_ids) for r in rows),
              "trained_tokens": sum(sum(lab != -100 for lab in r.labels) for r in rows)}
    ds = datasets.Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    return ds, report


def rehearsal_row_count(train_rows: int, share: float) -> int:
    """Rehearsal rows that make `share` of the mixed split: r / (train + r) = share."""
    return round(train_rows * share / (1 - share))


def mixed_with(dataset, rows: list[Row], share: float):
    """The training rows with rehearsal rows added (train.rehearsal): the rehearsal rows repeated
    in order until they are `share` of the whole; the trainer's shuffle spreads them, so each
    batch holds that share on average."""
    import datasets

    count = rehearsal_row_count(len(dataset), share) if rows else 0
    if not count:
        return dataset, 0
    taken = [rows[k % len(rows)] for k in range(count)]
    extra = datasets.Dataset.from_dict({"input_ids": [r.input_ids for r in taken], "labels": [r.labels for r in taken]})
    return datasets.concatenate_datasets([dataset, extra.cast(dataset.features)]), count


# --- template check ---------------------------------------------------------------------------

PROBE = [
    {"role": "system", "content": "You sort tickets."},
    {"role": "user", "content": "My invoice is wrong."},
    {"role": "assistant", "content": "billing"},
    {"role": "user", "content": "The app crashes."},
    {"role": "assistant", "content": "bug-report"},
]


def check_template(template: str, family: Family, kwargs: dict, where: str, tokenizer=None) -> None:
    """Every assistant turn's trained span must end with an end-of-turn token; a template that
    marks nothing, or leaves the end-of-turn token out, trains a model that never stops.
    Rendering needs no tokenizer, so `ft validate` checks hub models offline; with a tokenizer,
    each end-of-turn token must also be one token of its vocabulary."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if not re.search(r"{%-?\s*generation\s*-?%}", template):
        raise UserError(
            "the chat template has no {% generation %} ... {% endgeneration %} markers", where,
            "wrap each assistant turn's text and its end-of-turn token in {% generation %} blocks "
            "(see finetune/templates/*.train.jinja)",
        )
    try:
        rendered, indices = render_jinja_template(
            [PROBE], chat_template=template, return_assistant_tokens_mask=True,
            eos_token=family.eos_token, bos_token=family.bos_token or "", **kwargs)
    except Exception as exc:
        raise UserError(f"the chat template fails to render a plain conversation: {exc}", where,
                        "fix the template's Jinja") from None
    spans = [rendered[0][a:b] for a, b in indices[0]]
    if len(spans) != 2 or not all(s.endswith(family.end_of_turn) for s in spans):
        raise UserError(
            f"the trained spans {spans!r} do not each end with an end-of-turn token "
            f"({' or '.join(family.end_of_turn)})", where,
            "put the end-of-turn token inside the {% generation %} block of every assistant turn",
        )
    if tokenizer is not None:
        for token in family.end_of_turn:
            if tokenizer.encode(token, add_special_tokens=False) != [tokenizer.convert_tokens_to_ids(token)]:
                raise UserError(f"'{token}' is not a single token of the tokenizer", where,
                                "use the tokenizer the model was trained with")
