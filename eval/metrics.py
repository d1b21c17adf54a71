"""Task metrics: what "better" means for the user's job, computed per example where possible.

A metric is a function from a list of per-example outcomes to one number, so the paired
bootstrap can resample examples and recompute any of them, including macro-F1, which is not a
mean of per-example scores. Which metrics apply is read from the held-out references:
JSON answers → validity, per-field accuracy for categorical fields and ROUGE-L for free-text
fields; short answers with few distinct values → label accuracy and macro-F1; anything else →
exact match and ROUGE-L. Loss, perplexity and the clean-stop rate always apply.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from finetune.data import is_categorical


@dataclass
class Outcome:
    """One held-out example as one model answered it."""

    reference: str
    output: str
    stopped: bool  # ended with an end-of-turn token before the token budget
    nll: float  # summed negative log-likelihood of the reference's trained tokens
    tokens: int  # number of those tokens


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[list[Outcome]], float]
    higher_is_better: bool = True
    per_example: Callable[[Outcome], float] | None = None  # for predictions.jsonl and regressions
    is_mean: bool = False  # compute == mean of per_example (lets the bootstrap vectorize)


# --- building blocks ---------------------------------------------------------------------------

def normalize(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def parse_json_object(text: str) -> dict | None:
    """The answer as a JSON object, or None. The whole answer must be the object: a job that asks
    for one line of JSON is failed by a preamble or a Markdown fence around it, because the client
    parsing the answer fails on them (`json_shape` says which, for the report)."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.DOTALL)
JSON_SHAPES = ("valid", "fenced", "with_text", "cut_off", "no_object")


def contains_json_object(text: str) -> bool:
    """Whether some `{...}` inside the text parses as a JSON object."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return True
    return False


def json_shape(output: str, stopped: bool) -> str:
    """What an answer is, when a JSON object was asked for: `valid` (the answer is the object),
    `fenced` (an object inside a ``` fence), `with_text` (an object with a preamble or text after
    it), `cut_off` (an object begun but the token budget ran out), `no_object`. Only `valid`
    counts as valid JSON; the others are reported so a user sees *how* a model misses the format
    (real bases fence and chat; an under-trained fine-tune runs out of budget)."""
    if parse_json_object(output) is not None:
        return "valid"
    fenced = FENCE.search(output)
    if fenced and parse_json_object(fenced.group(1)) is not None:
        return "fenced"
    if contains_json_object(output):
        return "with_text"
    if not stopped and open_braces(output) > 0:
        return "cut_off"
    return "no_object"


def open_braces(text: str) -> int:
    """How many `{` are still open at the end of the text (braces inside JSON strings ignored)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            escaped, in_string = (False, in_string) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{}":
            depth = max(0, depth + (1 if ch == "{" else -1))
    return depth


_rouge = None


def rouge_l(reference: str, output: str) -> float:
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _rouge.score(reference, output)["rougeL"].fmeasure


def macro_f1(references: list[str], outputs: list[str]) -> float:
    """Mean F1 over the classes present in the references (an output outside them only costs
    precision nowhere and recall of its true class)."""
    classes = sorted(set(references))
    tp, fp, fn = defaultdict(int), defaultdict(int), defaultdict(int)
    for ref, out in zip(references, outputs):
        if ref == out:
            tp[ref] += 1
        else:
            fn[ref] += 1
            fp[out] += 1
    scores = []
    for c in classes:
        denom = 2 * tp[c] + fp[c] + fn[c]
        scores.append(2 * tp[c] / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def mean_of(fn: Callable[[Outcome], float]) -> Callable[[list[Outcome]], float]:
    return lambda outcomes: float(np.mean([fn(o) for o in outcomes])) if outcomes else 0.0


def token_loss(outcomes: list[Outcome]) -> float:
    tokens = sum(o.tokens for o in outcomes)
    return sum(o.nll for o in outcomes) / tokens if tokens else float("nan")


# --- the metrics -------------------------------------------------------------------------------

def per_metric(name: str, fn: Callable[[Outcome], float]) -> Metric:
    return Metric(name, mean_of(fn), True, fn, is_mean=True)


LOSS = Metric("loss", token_loss, higher_is_better=False,
              per_example=lambda o: o.nll / o.tokens if o.tokens else float("nan"))
PERPLEXITY = Metric("perplexity", lambda os: math.exp(min(token_loss(os), 50.0)), higher_is_better=False)
CLEAN_STOP = per_metric("clean_stop", lambda o: float(o.stopped))
EXACT = per_metric("exact_match", lambda o: float(o.output.strip() == o.reference.strip()))
NORMALIZED_EXACT = per_metric("normalized_exact_match", lambda o: float(normalize(o.output) == normalize(o.reference)))
ROUGE_L = per_metric("rougeL", lambda o: rouge_l(o.reference, o.output))
LABEL_ACCURACY = per_metric("label_accuracy", lambda o: float(o.output.strip() == o.reference.strip()))
MACRO_F1 = Metric("macro_f1", lambda os: macro_f1([o.reference.strip() for o in os], [o.output.strip() for o in os]))
JSON_VALID = per_metric("json_valid", lambda o: float(parse_json_object(o.output) is not None))


def json_field_accuracy(key: str) -> Metric:
    def score(o: Outcome) -> float:
        out = parse_json_object(o.output)
        ref = parse_json_object(o.reference)
        return float(out is not None and ref is not None and out.get(key) == ref.get(key))

    return per_metric(f"json.{key}.accuracy", score)


def json_field_rouge(key: str) -> Metric:
    def score(o: Outcome) -> float:
        out = parse_json_object(o.output) or {}
        ref = parse_json_object(o.reference) or {}
        return rouge_l(str(ref.get(key, "")), str(out.get(key, ""))) if key in out else 0.0

    return per_metric(f"json.{key}.rougeL", score)


def detect_metrics(references: list[str], labelled: bool = False) -> list[Metric]:
    """The metrics that fit these references (see the module docstring). `labelled`: the data
    loader already knows the answers are class labels (data.label_column, or detected on the
    whole training set, where a small held-out set cannot show it)."""
    common = [LOSS, PERPLEXITY, CLEAN_STOP]
    parsed = [parse_json_object(r) for r in references]
    if references and all(p is not None for p in parsed):
        keys = sorted({k for p in parsed for k in p}, key=lambda k: list(parsed[0]).index(k)
                      if k in parsed[0] else len(parsed[0]))
        fields = []
        for key in keys:
            values = [json.dumps(p.get(key), sort_keys=True) for p in parsed]
            fields.append(json_field_accuracy(key) if is_categorical(values) else json_field_rouge(key))
        return common + [JSON_VALID, EXACT] + fields
    if labelled or is_categorical([r.strip() for r in references]):
        return common + [LABEL_ACCURACY, MACRO_F1]
    return common + [EXACT, NORMALIZED_EXACT, ROUGE_L]


def by_name(names: list[str], references: list[str]) -> list[Metric]:
    """Metrics the recipe asks for by name; json.<key>.* names are built on demand."""
    fixed = {m.name: m for m in (LOSS, PERPLEXITY, CLEAN_STOP, EXACT, NORMALIZED_EXACT, ROUGE_L,
                                 LABEL_ACCURACY, MACRO_F1, JSON_VALID)}
    chosen = []
    for name in names:
        if name in fixed:
            chosen.append(fixed[name])
        elif re.fullmatch(r"json\.[^.]+\.accuracy", name):
            chosen.append(json_field_accuracy(name.split(".")[1]))
        elif re.fullmatch(r"json\.[^.]+\.rougeL", name):
            chosen.append(json_field_rouge(name.split(".")[1]))
        else:
            raise KeyError(name)
    return chosen


KNOWN = ["loss", "perplexity", "clean_stop", "exact_match", "normalized_exact_match", "rougeL",
         "label_accuracy", "macro_f1", "json_valid", "json.<key>.accuracy", "json.<key>.rougeL"]
