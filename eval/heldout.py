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

from finetune import render


@dataclass
class Item:
    where: str
    messages: list[dict]  # the conversation without its final assistant turn
    reference: str  # the final assistant turn
    prompt_ids: list[int]  # served template, generation prompt included
    input_ids: list[int]  # prompt_ids + the final answer, for loss
    labels: list[int]  # the final answer only


def build_items(examples, renderer: render.Renderer) -> list[Item]:
    items = []
    for e in examples:
        prompt_ids, row = renderer.final_turn(e)
        items.append(Item(e.where, e.messages[:-1], e.messages[-1]["content"], prompt_ids,
                          row.input_ids, row.labels))
    return items


def items_digest(items: list[Item]) -> str:
    payload = [[i.prompt_ids, i.input_ids, i.labels, i.reference] for i in items]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
