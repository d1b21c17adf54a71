"""Held-out items: what every column (base, fine-tuned, GGUF) is asked, in one fixed form.

An item carries the prompt exactly as the served chat template renders it (official template,
generation prompt appended), the reference answer, and the tokenized full conversation with
assistant-only labels for teacher-forced loss. Building these once keeps every column honest:
same ids, same labels, same prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from finetune import data as data_mod


@dataclass
class Item:
    where: str
    messages: list[dict]  # the conversation without its final assistant turn
    reference: str  # the final assistant turn
    prompt_ids: list[int]  # served template, generation prompt included
    input_ids: list[int]  # full conversation (training template) for loss
    labels: list[int]


def build_items(examples, tokenizer, family, train_template: str, kwargs: dict, max_length: int) -> list[Item]:
    served = family.read_template()
    items = []
    for e in examples:
        prompt = e.messages[:-1]
        prompt_ids = tokenizer.apply_chat_template(prompt, chat_template=served, tokenize=True,
                                                   add_generation_prompt=True, return_dict=True, **kwargs)["input_ids"]
        row = data_mod.tokenize(tokenizer, e, train_template, max_length, kwargs)
        items.append(Item(e.where, prompt, e.messages[-1]["content"], list(prompt_ids),
                          row["input_ids"], row["labels"]))
    return items


def items_digest(items: list[Item]) -> str:
    payload = [[i.prompt_ids, i.input_ids, i.labels, i.reference] for i in items]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
