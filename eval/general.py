"""General ability beside the job: what the fine-tune kept, and what it broke, against its base.

A narrow SFT can win every line of the held-out report while its format takes over everything
else (asked the capital of France, it answers `{"capital": "Paris"}`). Three kinds of evidence,
each base vs fine-tuned on the same items with a paired bootstrap interval:

- format leakage: general prompts (eval/general_prompts.jsonl, or the user's) served as a user
  message with no system message (so not the job's system prompt; the template's own default
  system text, where it has one, applies, as it does for any client that sends none), and the
  share of answers that take the job's answer shape (one JSON object when the held-out answers
  are JSON objects; one of the job's labels when they are class labels; free-text jobs have no
  shape to leak), over the prompts that do not ask for JSON themselves (kind "json"), beside the
  share that end cleanly;
- drift, without labels: on the base's own greedy answers to those prompts, the fine-tune's mean
  per-token loss minus the base's, and the mean per-token KL(base ‖ fine-tuned) (as peft's
  method comparison measures forgetting: `disable_adapter()` is the base);
- benchmarks, with labels: multiple choice by the log-likelihood of each choice after the query,
  0-shot, plain text without the chat template (lm-evaluation-harness's default for a local-file
  multiple_choice task: the choice after one space), `acc` and `acc_norm` (the sum divided by
  the choice's length in characters), over `{"query", "choices", "gold"}` JSON Lines files.

The base column is the 4-bit base training saw, with the adapter switched off: the same weights
the fine-tuned column runs on, so a delta is the adapter's doing and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from eval.base_cache import cache_key, read_cached, read_cached_tensor, store, store_tensor
from eval.columns import SCORE_LOGITS_BYTES, Generation, TransformersColumn, padded_batch, row_batches
from eval.heldout import Item
from eval.metrics import parse_json_object
from eval.stats import mean_interval
from finetune.data import is_categorical
from finetune.errors import UserError
from finetune.recipe import Recipe

GENERAL_FORMAT = 3  # bump when the general section's scoring or numerics change: cached base answers are redone
# 3: the CPU 4-bit layers hand back bf16 under autocast (finetune/dequantized.py)
ASKS_FOR_JSON = "json"  # the kind of general prompt that asks for JSON: left out of leakage


@dataclass
class GeneralPrompt:
    text: str
    kind: str
    where: str


@dataclass
class ChoiceItem:
    query: str
    choices: list[str]
    gold: int
    where: str


def read_jsonl_objects(path: Path, what: str) -> list[tuple[dict, str]]:
    """(row, file:line) of every row; anything but a JSON object per line is the user's mistake."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}", str(path), "check the path in the recipe")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON: {exc.msg}", where, f"each line of a {what} file is one JSON object")
        if not isinstance(row, dict):
            raise UserError(f"a {type(row).__name__}, not a JSON object", where,
                            f"each line of a {what} file is one JSON object")
        rows.append((row, where))
    if not rows:
        raise UserError(f"the {what} file is empty", str(path), "add rows, or leave it out of the recipe")
    return rows


def read_prompts(path: Path) -> list[GeneralPrompt]:
    prompts = []
    for row, where in read_jsonl_objects(path, "general prompts"):
        text = row.get("prompt")  # the user's file: its rows are checked here, not a record of ft's
        if not isinstance(text, str) or not text.strip():
            raise UserError("a row without a non-empty \"prompt\" string", where,
                            'write each row as {"prompt": "...", "kind": "..."} ("kind" is optional)')
        prompts.append(GeneralPrompt(text, str(row.get("kind", "user")), where))
    return prompts


def whole_prompt_set(recipe: Recipe) -> list[GeneralPrompt]:
    """ft's own set, replaced or extended by the recipe's file."""
    section = recipe.eval.general
    own = resources.files("eval").joinpath("general_prompts.jsonl")
    prompts = [] if (section.prompts and section.replace_prompts) else read_prompts(Path(str(own)))
    if section.prompts:
        prompts += read_prompts(Path(section.prompts))
    return prompts


def general_prompts(recipe: Recipe) -> list[GeneralPrompt]:
    """What the general section asks: the set's first eval.general.max_prompts."""
    prompts = whole_prompt_set(recipe)
    return prompts[: recipe.eval.general.max_prompts] if recipe.eval.general.max_prompts else prompts


def rehearsal_prompts(recipe: Recipe) -> list[GeneralPrompt]:
    """What rehearsal trains on: the set's prompts after those the general section asks (drift
    measured on answers the fine-tune was trained to give would flatter it), at most
    train.rehearsal_prompts."""
    asked = recipe.eval.general.max_prompts
    if asked is None:
        return []
    return whole_prompt_set(recipe)[asked: asked + recipe.train.rehearsal_prompts]


def read_benchmark(path: Path) -> list[ChoiceItem]:
    """A multiple-choice file as llm-foundry's eval data writes it; read strictly (a bad row is the
    user's mistake, named with its line, not a silently skewed score)."""
    fix = 'write each row as {"query": "...", "choices": ["...", "..."], "gold": <index of the right choice>}'
    items = []
    for row, where in read_jsonl_objects(path, "benchmark"):
        query, choices, gold = row.get("query"), row.get("choices"), row.get("gold")
        if not isinstance(query, str) or not query:
            raise UserError("\"query\" is missing or not a non-empty string", where, fix)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError("\"choices\" must be a list of at least two non-empty strings", where, fix)
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"\"gold\" must be an index into choices (0 to {len(choices) - 1}), got {gold!r}",
                            where, fix)
        items.append(ChoiceItem(query, choices, gold, where))
    return items


# --- the job's answer shape ---------------------------------------------------------------------

@dataclass
class JobShape:
    """What an answer looks like when the job's format has taken it over."""

    description: str
    labels: frozenset[str] = frozenset()  # for a label job: the job's labels

    def matches(self, answer: str) -> bool:
        if self.labels:
            return answer.strip() in self.labels
        return parse_json_object(answer) is not None


def job_shape(references: list[str]) -> JobShape | None:
    """JSON-object answers leak as a JSON object; class labels as one of the labels; free text has
    no shape to test (its drift still shows)."""
    if references and all(parse_json_object(r) is not None for r in references):
        return JobShape("one JSON object, as the job answers")
    stripped = [r.strip() for r in references]
    if references and is_categorical(stripped):
        return JobShape("one of the job's labels", frozenset(stripped))
    return None


# --- measures -----------------------------------------------------------------------------------

@dataclass
class GeneralRow:
    """One line of the general section: each column's value, and the paired delta."""

    key: str  # what eval.require names it by: general.leakage, general.drift_kl, general.<benchmark>.acc
    name: str
    higher_is_better: bool
    base: float
    tuned: float
    delta: float
    low: float
    high: float
    items: int
    sided: bool = True  # False for a distance from the base (KL): no side to lose on, only a size

    @property
    def lost(self) -> bool:
        """The whole interval lies on the losing side: the fine-tune is worse here, not noise."""
        if not self.sided:
            return False
        return self.high < 0 if self.higher_is_better else self.low > 0

    @property
    def worst_improvement(self) -> float:
        """The interval's end on the losing side, as an improvement (what a gate bounds)."""
        return self.low if self.higher_is_better else -self.high


def paired_row(key: str, name: str, higher_is_better: bool, base: list[float], tuned: list[float], samples: int,
               confidence: float, sided: bool = True) -> GeneralRow:
    delta, low, high = mean_interval([t - b for b, t in zip(base, tuned)], samples, confidence)
    return GeneralRow(key, name, higher_is_better, sum(base) / max(len(base), 1),
                      sum(tuned) / max(len(tuned), 1), delta, low, high, len(base), sided)


@dataclass
class General:
    """The general section of a report."""

    prompts: int
    shape: str | None  # the job shape leakage is tested against (None: a free-text job)
    rows: list[GeneralRow] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # a few prompts the fine-tune answers in the job's shape
    answers: list[dict] = field(default_factory=list)  # every prompt and both answers (eval/general.jsonl)
    base_cached: bool = False
    precision: str = "compute dtype"  # what the decoding and drift ran in (section_precision)

    def row(self, key: str) -> GeneralRow | None:
        return next((r for r in self.rows if r.key == key), None)

    def verdict(self) -> str:
        lost = [r for r in self.rows if r.lost]
        if not lost:
            return "general: no interval lies wholly on the losing side"
        return "general: the fine-tune lost ground on " + "; ".join(
            f"{r.name} ({r.delta:+.4f} [{r.low:+.4f}, {r.high:+.4f}])" for r in lost)


def planned_keys(recipe: Recipe, references: list[str]) -> list[str]:
    """The general rows `ft eval` will report, known before any weights load (gates are checked
    against them before training)."""
    if not recipe.eval.general.enabled:
        return []
    keys = ["general.leakage"] if job_shape(references) else []
    keys += ["general.clean_stop", "general.drift_loss", "general.drift_kl"]
    for path in recipe.eval.general.benchmarks:
        keys += [f"general.{Path(path).stem}.acc", f"general.{Path(path).stem}.acc_norm"]
    return keys


def read_benchmarks(recipe: Recipe) -> dict[str, list[ChoiceItem]]:
    """Every eval.general.benchmarks file by name, read strictly and capped: called before any
    weights load, so a bad row stops `ft train` before training, not after."""
    cap = recipe.eval.general.benchmark_max_items
    return {Path(path).stem: read_benchmark(Path(path))[:cap] for path in recipe.eval.general.benchmarks}


def prompt_items(prompts: list[GeneralPrompt], renderer) -> list[Item]:
    """Each prompt as a one-message chat, rendered by the served template in the trained mode."""
    items = []
    for p in prompts:
        messages = [{"role": "user", "content": p.text}]
        ids = renderer.served_prompt_ids(messages)
        items.append(Item(p.where, messages, "", ids, ids, [-100] * len(ids)))
    return items


def answered_items(items: list[Item], answers: list[Generation]) -> list[Item]:
    """The base's answers after their prompts, the answer's tokens labelled: what drift is
    measured on (teacher forcing, both models on the very tokens the base generated, not a
    re-encoding of its text)."""
    return [Item(i.where, i.messages, a.text, i.prompt_ids, i.prompt_ids + a.tokens,
                 [-100] * len(i.prompt_ids) + a.tokens) for i, a in zip(items, answers)]


def answer_states(model, tokenizer, items: list[Item], batch_size: int, adapter: bool):
    """The last hidden state (what the LM head reads) at every position that predicts an answer
    token, all items' positions concatenated in order, and those tokens. The decoder runs without
    its LM head: the head's [positions, vocabulary] product is the dearest part of a small model's
    forward, and only answer positions need it."""
    import contextlib

    import torch

    decoder = model.get_base_model().get_decoder()
    states = [None] * len(items)
    switch = contextlib.nullcontext() if adapter else model.disable_adapter()
    with torch.no_grad(), switch:
        for chunk in row_batches(items, batch_size, vocab=1):  # no logits held: rows by batch size
            ids, mask, labels = padded_batch([items[i] for i in chunk], tokenizer.pad_token_id, model.device)
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            valid = labels[:, 1:] != -100  # position t predicts token t+1
            for row, i in enumerate(chunk):
                states[i] = hidden[row][valid[row]].float()
    targets = [label for i in items for label in i.labels[1:] if label != -100]
    return torch.cat(states), torch.tensor(targets, dtype=torch.long)


def head_log_softmax(model, states, adapter: bool, copies: int):
    """(slice, log-softmax of the LM head over those positions' hidden states), in slices of
    positions that keep `copies` such [positions, vocabulary] arrays within SCORE_LOGITS_BYTES."""
    import contextlib

    import torch

    head = model.get_base_model().get_output_embeddings()
    vocab = model.config.get_text_config().vocab_size
    step = max(1, SCORE_LOGITS_BYTES // (vocab * 4 * copies))
    for start in range(0, len(states), step):
        part = slice(start, start + step)
        # the base's side with the adapter off: a recipe may put LoRA on the head too. Both
        # contexts close before the yield: a suspended generator must not hold them open.
        with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
            logp = torch.log_softmax(head(states[part].to(head.weight.dtype)).float(), -1)
        yield part, logp


def drift(model, tokenizer, items: list[Item], base_states, batch_size: int) -> list[tuple[float, float, float]]:
    """Per item: (base loss per token, fine-tuned loss per token, KL(base ‖ fine-tuned) per token)
    over the answer's tokens. `base_states`: answer_states of the base (cached with its answers:
    they depend only on the base and the prompts), so only the fine-tune runs its decoder here;
    both go through the same LM head, slice by slice."""
    import torch

    tuned_states, targets = answer_states(model, tokenizer, items, batch_size, adapter=True)
    per_position = torch.zeros(3, len(targets))
    pairs = zip(head_log_softmax(model, base_states, adapter=False, copies=3),
                head_log_softmax(model, tuned_states, adapter=True, copies=3))
    for (part, base), (_, tuned) in pairs:
        index = targets[part].unsqueeze(-1)
        per_position[0, part] = -base.gather(-1, index).squeeze(-1)
        per_position[1, part] = -tuned.gather(-1, index).squeeze(-1)
        per_position[2, part] = (base.exp() * (base - tuned)).sum(-1)
    results, start = [], 0
    for item in items:
        n = sum(1 for label in item.labels[1:] if label != -100)
        mean = per_position[:, start:start + n].sum(1) / max(n, 1)
        results.append((float(mean[0]), float(mean[1]), float(mean[2])))
        start += n
    return results


def target_logprobs(model, states, targets, adapter: bool):
    """log p(target) at each position, from its last hidden state."""
    import torch

    picked = torch.zeros(len(targets))
    for part, logp in head_log_softmax(model, states, adapter, copies=2):
        picked[part] = logp.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1)
    return picked


def choice_logliks(model, tokenizer, items: list[ChoiceItem], batch_size: int, adapter: bool) -> list[list[float]]:
    """Each choice's summed log-likelihood after its query, as lm-evaluation-harness computes it
    (`_encode_pair`: the context encoded alone, the continuation as what the whole adds to it; no
    special tokens; `target_delimiter` " "). The LM head runs only where a continuation token is
    predicted (answer_states)."""
    pairs = []
    for k, item in enumerate(items):
        context = tokenizer.encode(item.query, add_special_tokens=False)
        for c, choice in enumerate(item.choices):
            whole = tokenizer.encode(item.query + " " + choice, add_special_tokens=False)
            pairs.append((k, c, whole, len(context)))
    scored = [Item("", [], "", [], whole, [-100] * start + whole[start:]) for _, _, whole, start in pairs]
    states, targets = answer_states(model, tokenizer, scored, batch_size, adapter)
    picked = target_logprobs(model, states, targets, adapter)
    sums = [[0.0] * len(item.choices) for item in items]
    start = 0
    for (k, c, whole, begin) in pairs:
        n = len(whole) - begin
        sums[k][c] = float(picked[start:start + n].sum())
        start += n
    return sums


def multiple_choice_correct(items: list[ChoiceItem], logliks: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per item, 1.0 or 0.0 for `acc` (argmax of the sum) and `acc_norm` (argmax of the sum divided
    by the choice's length in characters), as lm-evaluation-harness defines them."""
    acc, acc_norm = [], []
    for item, lls in zip(items, logliks):
        best = max(range(len(lls)), key=lambda c: lls[c])
        best_norm = max(range(len(lls)), key=lambda c: lls[c] / len(item.choices[c]))
        acc.append(float(best == item.gold))
        acc_norm.append(float(best_norm == item.gold))
    return acc, acc_norm


# --- the base's answers, cached ------------------------------------------------------------------

def base_answers_key(base_identity: list, recipe: Recipe, items: list[Item]) -> str:
    return cache_key([GENERAL_FORMAT, base_identity, recipe.model.revision, recipe.quantization.model_dump(),
                      recipe.eval.general.max_new_tokens, [i.prompt_ids for i in items], section_precision(recipe)])


def section_precision(recipe: Recipe) -> str:
    """On a CPU with native bf16, where training ran under bf16 autocast (train.cpu_bf16), the
    section's decoding and drift run so too: the numerics the fine-tune was trained in, and 1.7×
    faster on the demo (bench/RESULTS.md 12). Both columns run in it, so the base against itself
    still gives zero. The job's held-out comparison and the multiple-choice benchmarks (checked
    against lm-evaluation-harness in fp32) stay in the compute dtype. On a GPU the compute dtype
    is bf16 already."""
    from finetune.loading import cpu_bf16

    return "bf16 autocast" if cpu_bf16(recipe) else "compute dtype"


def section_autocast(recipe: Recipe):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=section_precision(recipe) == "bf16 autocast")


def cached_base(key: str):
    """The base's general answers and its hidden states at their tokens, or (None, None)."""
    rows, states = read_cached("general-base", key), read_cached_tensor("general-base", key)
    if rows is None or states is None:
        return None, None
    return [Generation(**a) for a in rows], states


def evaluate_general(recipe: Recipe, model, prep, references: list[str], base_identity: list,
                     benchmarks: dict[str, list[ChoiceItem]], use_cache: bool = True,
                     progress=lambda line: None) -> General:
    """The general section for a loaded base+adapter (`model`, a peft model); `benchmarks`:
    read_benchmarks' files."""
    section, ev = recipe.eval.general, recipe.eval
    prompts = general_prompts(recipe)
    items = prompt_items(prompts, prep.renderer)
    eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
    common = dict(tokenizer=prep.tokenizer, end_of_turn_ids=eot, batch_size=ev.batch_size,
                  max_new_tokens=section.max_new_tokens)
    key = base_answers_key(base_identity, recipe, items)
    base, base_states = cached_base(key) if use_cache else (None, None)
    cached = base is not None
    if base is None:
        progress(f"general: the base answers {len(items)} general prompts (cached for later runs)")
        with section_autocast(recipe):
            base = TransformersColumn("base", model, adapter=False, **common).generate(items)
            base_states, _ = answer_states(model, prep.tokenizer, answered_items(items, base), ev.batch_size,
                                           adapter=False)
        store_tensor("general-base", key, base_states)  # before the answers: they mark the entry whole
        store("general-base", key, [asdict(a) for a in base])
    progress(f"general: the fine-tune answers {len(items)} general prompts")
    with section_autocast(recipe):
        tuned = TransformersColumn("fine-tuned", model, adapter=True, **common).generate(items)
    shape = job_shape(references)
    result = General(len(items), shape.description if shape else None, base_cached=cached,
                     precision=section_precision(recipe))
    result.answers = [{"where": p.where, "kind": p.kind, "prompt": p.text,
                       **{column: {"text": a.text, "stopped": a.stopped,
                                   "job_shape": shape.matches(a.text) if shape else None}
                          for column, a in (("base", b), ("fine-tuned", t))}}
                      for p, b, t in zip(prompts, base, tuned)]
    n, conf = ev.bootstrap_samples, ev.confidence
    if shape:
        # a prompt that asks for JSON (kind "json") is answered right in JSON: it cannot leak
        free = [k for k, p in enumerate(prompts) if p.kind != ASKS_FOR_JSON]
        result.rows.append(paired_row("general.leakage", "leakage: answers in the job's shape", False,
                                      [float(shape.matches(base[k].text)) for k in free],
                                      [float(shape.matches(tuned[k].text)) for k in free], n, conf))
        result.examples = [{"where": prompts[k].where, "prompt": prompts[k].text, "base": base[k].text,
                            "fine-tuned": tuned[k].text}
                           for k in free if shape.matches(tuned[k].text) and not shape.matches(base[k].text)][:3]
    result.rows.append(paired_row("general.clean_stop", "clean stop", True, [float(a.stopped) for a in base],
                                  [float(a.stopped) for a in tuned], n, conf))
    with section_autocast(recipe):
        per_item = drift(model, prep.tokenizer, answered_items(items, base), base_states, ev.batch_size)
    result.rows.append(paired_row("general.drift_loss", "drift: loss on the base's answers", False,
                                  [b for b, _, _ in per_item], [t for _, t, _ in per_item], n, conf))
    # every adapter moves away from its base: the KL's size is the news, not its sign
    result.rows.append(paired_row("general.drift_kl", "drift: KL(base ‖ fine-tuned)", False, [0.0] * len(per_item),
                                  [k for _, _, k in per_item], n, conf, sided=False))
    for name, bench in benchmarks.items():
        progress(f"general: {name}, {len(bench)} multiple-choice items, base and fine-tuned")
        base_acc, base_norm = multiple_choice_correct(
            bench, choice_logliks(model, prep.tokenizer, bench, ev.batch_size, adapter=False))
        tuned_acc, tuned_norm = multiple_choice_correct(
            bench, choice_logliks(model, prep.tokenizer, bench, ev.batch_size, adapter=True))
        result.rows.append(paired_row(f"general.{name}.acc", f"{name}: acc", True, base_acc, tuned_acc, n, conf))
        result.rows.append(paired_row(f"general.{name}.acc_norm", f"{name}: acc_norm", True, base_norm, tuned_norm,
                                      n, conf))
    return result
