"""A column is "a model that can score and generate": base, fine-tuned, and later the GGUF.

`score` gives each held-out item's summed negative log-likelihood over its trained tokens
(teacher forcing); `generate` answers each prompt greedily and says whether the answer ended
with an end-of-turn token (a clean stop) or ran out of budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

from eval.heldout import Item


@dataclass
class Generation:
    text: str
    stopped: bool
    tokens: list[int] = field(default_factory=list)  # the answer's ids, its end-of-turn token included when stopped


class Column(Protocol):
    name: str

    def score(self, items: list[Item]) -> list[tuple[float, int]]: ...

    def generate(self, items: list[Item]) -> list[Generation]: ...


SCORE_LOGITS_BYTES = 256 << 20  # fp32 logits one scoring pass may hold (twice that with log-softmax)


def batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def row_batches(items: list[Item], batch_size: int, vocab: int, copies: int = 1):
    """Indices of `items` in teacher-forcing batches, shortest first (less padding). Teacher forcing
    holds [rows, width, vocabulary] logits and their log-softmax (`copies` such arrays): with a
    large eval batch (one batch of 64 is fastest for generation on a CPU) and a 49k-250k
    vocabulary that is gigabytes, so a batch takes as many rows as fit SCORE_LOGITS_BYTES."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    widest = max((len(i.input_ids) for i in items), default=1)
    rows = max(1, min(batch_size, SCORE_LOGITS_BYTES // (widest * vocab * 4 * copies)))
    yield from batches(order, rows)


def padded_batch(chunk: list[Item], pad: int, device):
    """(input_ids, attention_mask, labels) of these items, right-padded to the longest."""
    import torch

    width = max(len(item.input_ids) for item in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, item in enumerate(chunk):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


class TransformersColumn:
    """A transformers model; with a peft model, `adapter=False` scores the base underneath it,
    so base and fine-tuned share one copy of the weights."""

    def __init__(self, name: str, model, tokenizer, end_of_turn_ids: list[int], batch_size: int,
                 max_new_tokens: int, adapter: bool = True):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.eot = end_of_turn_ids
        self.batch_size, self.max_new_tokens, self.adapter = batch_size, max_new_tokens, adapter

    def _context(self):
        if not self.adapter and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def score(self, items: list[Item]) -> list[tuple[float, int]]:
        import torch

        results: list[tuple[float, int]] = [(0.0, 0)] * len(items)
        vocab = self.model.config.get_text_config().vocab_size
        with torch.no_grad(), self._context():
            for chunk in row_batches(items, self.batch_size, vocab):
                ids, mask, labels = padded_batch([items[i] for i in chunk], self.tokenizer.pad_token_id,
                                                 self.model.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
                # position t predicts token t+1
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                target = labels[:, 1:]
                valid = target != -100
                picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll = -(picked * valid).sum(dim=1)
                for row, i in enumerate(chunk):
                    results[i] = (float(nll[row]), int(valid[row].sum()))
        return results

    def generate(self, items: list[Item]) -> list[Generation]:
        import torch

        device = self.model.device
        out: list[Generation] = [Generation("", False)] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))
        pad = self.tokenizer.pad_token_id
        with torch.no_grad(), self._context():
            for chunk in batches(order, self.batch_size):
                width = max(len(items[i].prompt_ids) for i in chunk)
                # left padding: every prompt ends at the same position, where generation starts
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    p = items[i].prompt_ids
                    ids[row, width - len(p):] = torch.tensor(p)
                    mask[row, width - len(p):] = 1
                generated = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=self.max_new_tokens, eos_token_id=self.eot, pad_token_id=pad,
                    use_cache=True,  # a model set up for training (gradient checkpointing) turns it off
                    temperature=None, top_p=None, top_k=None,
                )
                for row, i in enumerate(chunk):
                    out[i] = self.finish(generated[row, width:].tolist())
        return out

    def finish(self, new_tokens: list[int]) -> Generation:
        """Cut at the first end-of-turn token; no such token means the budget ran out."""
        for pos, token in enumerate(new_tokens):
            if token in self.eot:
                return Generation(self.tokenizer.decode(new_tokens[:pos]).strip(), True, new_tokens[:pos + 1])
        return Generation(self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), False, new_tokens)


class GGUFColumn:
    """The shipped GGUF through llama.cpp, fed the same token ids (tokenizer parity is part of
    export verification) and stopped by the same end-of-turn tokens as the Modelfile."""

    def __init__(self, name: str, path, tokenizer, end_of_turn_ids: list[int], max_new_tokens: int, n_ctx: int):
        from export.llama import GGUFModel

        self.name, self.tokenizer = name, tokenizer
        self.eot, self.max_new_tokens = set(end_of_turn_ids), max_new_tokens
        self.model = GGUFModel(path, n_ctx)

    def score(self, items: list[Item]) -> list[tuple[float, int]]:
        import numpy as np
        import torch

        results = []
        for item in items:
            logits = torch.from_numpy(self.model.logits(item.input_ids)[:-1])
            logp = torch.log_softmax(logits, dim=-1).numpy()
            targets = np.array(item.labels[1:])
            valid = targets != -100
            nll = -logp[np.arange(len(targets))[valid], targets[valid]].sum()
            results.append((float(nll), int(valid.sum())))
        return results

    def generate(self, items: list[Item]) -> list[Generation]:
        out = []
        for item in items:
            tokens, stopped = self.model.generate(item.prompt_ids, self.max_new_tokens, self.eot)
            text = self.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=not stopped)
            out.append(Generation(text.strip(), stopped, tokens))
        return out

    def close(self) -> None:
        self.model.close()
