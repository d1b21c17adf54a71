"""The evaluation report: a table a person reads in ten seconds, and the same numbers for machines.

    runs/<name>/eval/report.md        metric | base | fine-tuned | delta | 95% CI
    runs/<name>/eval/report.json      every number, gates, settings, regressed examples
    runs/<name>/eval/comparison.png   bar chart per metric and column
    runs/<name>/eval/predictions.jsonl  per example: prompt, reference, each output, scores
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from rich.table import Table

from eval.general import General
from eval.served import Divergence, Speed
from eval.heldout import Item
from eval.metrics import JSON_SHAPES, Metric, Outcome, json_shape
from eval.stats import paired_bootstrap
from finetune.run import Record, RunDir, atomic_write_text, write_json

BASE, TUNED, GGUF, SERVED = "base", "fine-tuned", "gguf", "served"


@dataclass
class MetricRow:
    name: str
    higher_is_better: bool
    values: dict[str, float]  # column → value
    delta: float  # fine-tuned − base
    low: float
    high: float

    @property
    def improvement(self) -> float:
        """Positive when the fine-tune is better, whatever the metric's direction."""
        return self.delta if self.higher_is_better else -self.delta

    @property
    def significant(self) -> bool:
        return not (self.low <= 0 <= self.high)


@dataclass
class Gate:
    """A task metric's gate bounds its improvement on the held-out set; a general row's gate
    (general.*) bounds the losing end of its paired interval, so noise cannot pass a real loss:
    `general.leakage: -0.02` holds when the leakage rose by at most 0.02 at the interval's worst."""

    metric: str
    required: float
    improvement: float | None
    base: float | None
    tuned: float | None
    interval_end: bool = False  # improvement is the interval's losing end (a general row)

    @property
    def passed(self) -> bool:
        return self.improvement is not None and self.improvement >= self.required

    def message(self) -> str:
        if self.improvement is None:
            return f"gate on '{self.metric}': no such metric in this evaluation"
        verb = "passed" if self.passed else "FAILED"
        how = "at its interval's worst end, improved by" if self.interval_end else "improved by"
        return (f"gate {verb}: {self.metric} {how} {self.improvement:+.4f} "
                f"(base {self.base:.4f} → fine-tuned {self.tuned:.4f}), required {self.required:+.4f}")


class EvalSettings(Record):
    """How the columns were computed: report.json's "settings"."""

    max_new_tokens: int
    bootstrap_samples: int
    confidence: float
    decoding: str = "greedy"
    base_column_cached: bool = False
    base_cache_key: str | None = None
    template_kwargs: dict[str, bool] = {}  # pydantic copies a mutable default per record
    gguf: str | None = None  # the file the GGUF column answered with
    served_url: str | None = None  # the server the served column asked (ft eval --served)
    served_model: str | None = None


@dataclass
class Served:
    """The served column beside the others: each task metric's delta against the base, with its
    paired interval (a chat API gives no loss), the answers that differ from the shipped file's,
    and the speed the application sees."""

    url: str
    model: str
    request_fields: dict  # what --request-field added to every request
    rows: list[MetricRow]  # values: {"served": v}; delta, low, high: served − base
    divergence: Divergence
    speed: Speed


@dataclass
class Report:
    rows: list[MetricRow]
    columns: list[str]
    n: int
    gates: list[Gate] = field(default_factory=list)
    regressed: list[dict] = field(default_factory=list)
    settings: EvalSettings | None = None
    json_shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # column → shape → answers
    general: General | None = None  # what the fine-tune kept and lost beside the job (eval/general.py)
    served: Served | None = None  # ft eval --served (eval/served.py)

    def row(self, name: str) -> MetricRow | None:
        return next((r for r in self.rows if r.name == name), None)


NOT_SERVED = ("loss", "perplexity")  # need the model's probabilities: a chat API returns none


def served_rows(metrics: list[Metric], outcomes: dict[str, list[Outcome]], samples: int,
                confidence: float) -> list[MetricRow]:
    """The served column against the base, paired on the same prompts, as the fine-tuned one is."""
    rows = []
    for m in metrics:
        if m.name in NOT_SERVED:
            continue
        delta, low, high = paired_bootstrap(m, outcomes[BASE], outcomes[SERVED], samples, confidence)
        rows.append(MetricRow(m.name, m.higher_is_better, {SERVED: m.compute(outcomes[SERVED])}, delta, low, high))
    return rows


def compare(metrics: list[Metric], outcomes: dict[str, list[Outcome]], require: dict[str, float],
            samples: int, confidence: float, general: General | None = None,
            served: Served | None = None) -> Report:
    rows = []
    for m in metrics:
        delta, low, high = paired_bootstrap(m, outcomes[BASE], outcomes[TUNED], samples, confidence)
        rows.append(MetricRow(m.name, m.higher_is_better, {c: m.compute(o) for c, o in outcomes.items()},
                              delta, low, high))
    report = Report(rows, list(outcomes), len(outcomes[BASE]), served=served)
    if any(m.name == "json_valid" for m in metrics):
        for column, answers in outcomes.items():
            shapes = [json_shape(o.output, o.stopped) for o in answers]
            report.json_shapes[column] = {shape: shapes.count(shape) for shape in JSON_SHAPES}
    report.general = general
    for name, required in require.items():
        g = general.row(name) if general else None
        if g is not None:
            report.gates.append(Gate(name, required, g.worst_improvement, g.base, g.tuned, interval_end=True))
            continue
        r = report.row(name)
        report.gates.append(Gate(name, required, r.improvement if r else None,
                                 r.values[BASE] if r else None, r.values[TUNED] if r else None))
        # the served column must hold the same gate: what the application gets, after every upgrade
        s = next((x for x in served.rows if x.name == name), None) if served else None
        if s is not None:
            report.gates.append(Gate(f"{name} (served)", required, s.improvement, r.values[BASE], s.values[SERVED]))
    return report


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"


def markdown(report: Report, title: str, confidence: float) -> str:
    pct = f"{confidence:.0%}"
    extra = [c for c in report.columns if c not in (BASE, TUNED)]
    head = ["metric", BASE, TUNED, *extra, "delta", f"{pct} CI", ""]
    lines = [f"# {title}: held-out evaluation", "",
             f"{report.n} held-out examples; delta = fine-tuned − base; CI = paired bootstrap "
             f"({report.settings.bootstrap_samples} resamples). ✔ = fine-tune better and the "
             "CI excludes 0; ✘ = worse and the CI excludes 0.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        mark = ("✔" if r.improvement > 0 else "✘") if r.significant else ""
        cells = [r.name + ("" if r.higher_is_better else " ↓"), fmt(r.values[BASE]), fmt(r.values[TUNED]),
                 *[fmt(r.values[c]) for c in extra], f"{r.delta:+.4f}", f"[{r.low:+.4f}, {r.high:+.4f}]", mark]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "↓ lower is better."]
    if report.json_shapes:
        lines += ["", json_shapes_note(report)]
    if report.general:
        lines += ["", *general_markdown(report.general, pct)]
    if report.served:
        lines += ["", *served_markdown(report.served, pct)]
    if report.gates:
        lines += ["", "## Gates", ""] + [f"- {g.message()}" for g in report.gates]
    lines += ["", f"Examples where the fine-tune scored lower than the base on a task metric: "
              f"{len(report.regressed)} (listed in report.json and predictions.jsonl)."]
    return "\n".join(lines) + "\n"


def general_json(general: General) -> dict:
    return {"prompts": general.prompts, "shape": general.shape, "base_cached": general.base_cached,
            "precision": general.precision,
            "verdict": general.verdict(), "examples": general.examples,
            "rows": [{"key": r.key, "name": r.name, "higher_is_better": r.higher_is_better, "base": r.base,
                      "fine-tuned": r.tuned, "delta": r.delta, "ci": [r.low, r.high], "items": r.items,
                      "lost": r.lost} for r in general.rows]}


def general_markdown(general: General, pct: str) -> list[str]:
    shape = (f"leakage = share of answers in the job's shape ({general.shape})" if general.shape
             else "a free-text job has no answer shape to leak")
    lines = ["## Beside the job", "",
             f"{general.prompts} general prompts, sent with no system message; {shape}; drift is measured on "
             "the base's own answers (per token; KL is 0 for the base by definition). Decoding and drift ran in "
             f"{general.precision}{' (as training did)' if general.precision == 'bf16 autocast' else ''}.", "",
             f"| general | {BASE} | {TUNED} | delta | {pct} CI | |", "|---|---|---|---|---|---|"]
    for r in general.rows:
        mark = "✘" if r.lost else ""
        lines.append(f"| {r.name}{'' if r.higher_is_better else ' ↓'} | {fmt(r.base)} | {fmt(r.tuned)} "
                     f"| {r.delta:+.4f} | [{r.low:+.4f}, {r.high:+.4f}] | {mark} |")
    lines += ["", general.verdict() + "."]
    for e in general.examples:
        lines += ["", f"- {e['prompt']!r}: base {e['base'][:120]!r}; fine-tuned {e['fine-tuned'][:120]!r}"]
    return lines


def served_lines(served: Served) -> list[str]:
    """Divergence and speed, in words: under the table in the terminal and in report.md."""
    d, sp = served.divergence, served.speed
    first = (f", first token p50 {sp.first_token_p50_s:.2f} s / p95 {sp.first_token_p95_s:.2f} s"
             if sp.first_token_p50_s is not None else "")
    return [f"served ({served.model} at {served.url}): {d.differ} of {d.total} answers differ from the GGUF "
            f"column's" + (" (the server answers as the shipped file does)" if not d.differ else ""),
            f"served speed: {sp.requests} requests, {sp.concurrency} at once: latency p50 {sp.latency_p50_s:.2f} s / "
            f"p95 {sp.latency_p95_s:.2f} s{first}; {sp.tokens_per_s:.1f} output tokens/s "
            f"({sp.output_tokens} tokens in {sp.wall_s:.1f} s)"]


def served_markdown(served: Served, pct: str) -> list[str]:
    lines = ["## What the server answers", "", *[f"- {line}" for line in served_lines(served)], "",
             f"| metric | {SERVED} | served − base | {pct} CI |", "|---|---|---|---|"]
    for r in served.rows:
        lines.append(f"| {r.name}{'' if r.higher_is_better else ' ↓'} | {fmt(r.values[SERVED])} | {r.delta:+.4f} "
                     f"| [{r.low:+.4f}, {r.high:+.4f}] |")
    lines.append("")
    lines.append("Loss and perplexity: not available (a chat API returns no probabilities).")
    for e in served.divergence.examples:
        lines += ["", f"- {e['where']}: {e['likely_cause']}", f"  - gguf: {e['gguf'][:200]!r}",
                  f"  - served: {e['served'][:200]!r}"]
    return lines


def served_json(served: Served) -> dict:
    from dataclasses import asdict

    return {"url": served.url, "model": served.model, "request_fields": served.request_fields,
            "metrics": [{"name": r.name, "value": r.values[SERVED], "delta": r.delta, "ci": [r.low, r.high]}
                        for r in served.rows],
            "divergence": asdict(served.divergence), "speed": {**asdict(served.speed),
                                                                "tokens_per_s": served.speed.tokens_per_s}}


SHAPE_WORDS = {"fenced": "inside a ``` fence", "with_text": "with text around the object",
               "cut_off": "cut off by the token budget", "no_object": "without a JSON object"}


def json_shapes_note(report: Report) -> str:
    """How the answers that are not one JSON object miss it, per column."""
    parts = []
    for column, shapes in report.json_shapes.items():
        misses = [f"{shapes[s]} {SHAPE_WORDS[s]}" for s in SHAPE_WORDS if shapes[s]]
        parts.append(f"{column}: " + (", ".join(misses) if misses else "none"))
    return ("Answers that are not one JSON object, counted as invalid (the job asks for JSON, and a "
            "client parsing the answer fails on a fence or a preamble): " + "; ".join(parts) + ".")


def table(report: Report, title: str) -> Table:
    extra = [c for c in report.columns if c not in (BASE, TUNED)]
    t = Table(title=f"{title}: {report.n} held-out examples", title_justify="left")
    for col in ["metric", BASE, TUNED, *extra, "delta", "95% CI", ""]:
        t.add_column(col, justify="left" if col == "metric" else "right")
    for r in report.rows:
        mark = ("[green]✔[/green]" if r.improvement > 0 else "[red]✘[/red]") if r.significant else ""
        t.add_row(r.name + ("" if r.higher_is_better else " ↓"), fmt(r.values[BASE]), fmt(r.values[TUNED]),
                  *[fmt(r.values[c]) for c in extra], f"{r.delta:+.4f}", f"[{r.low:+.4f}, {r.high:+.4f}]", mark)
    if report.general:
        t.add_section()
        for r in report.general.rows:
            t.add_row(f"general: {r.name}" + ("" if r.higher_is_better else " ↓"), fmt(r.base), fmt(r.tuned),
                      *["" for _ in extra], f"{r.delta:+.4f}", f"[{r.low:+.4f}, {r.high:+.4f}]",
                      "[red]✘[/red]" if r.lost else "")
    return t


def plot(report: Report, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bounded = [r for r in report.rows if r.name not in ("loss", "perplexity")]
    loss = report.row("loss")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [max(len(bounded), 1), 1.2]})
    width = 0.8 / len(report.columns)
    x = np.arange(len(bounded))
    for k, column in enumerate(report.columns):
        axes[0].bar(x + k * width, [r.values[column] for r in bounded], width, label=column)
    axes[0].set_xticks(x + width * (len(report.columns) - 1) / 2, [r.name for r in bounded], rotation=30, ha="right")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("task metrics (higher is better)")
    axes[0].legend()
    if loss:
        axes[1].bar(report.columns, [loss.values[c] for c in report.columns], color=["C0", "C1", "C2", "C3"][: len(report.columns)])
        axes[1].set_title("held-out loss (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(".comparison.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def regressions(metrics: list[Metric], items: list[Item], outcomes: dict[str, list[Outcome]]) -> list[dict]:
    task = [m for m in metrics if m.per_example is not None and m.name not in ("loss",)]
    found = []
    for i, item in enumerate(items):
        worse = [m.name for m in task
                 if m.per_example(outcomes[TUNED][i]) < m.per_example(outcomes[BASE][i])]
        if worse:
            found.append({"index": i, "where": item.where, "regressed_on": worse})
    return found


def write(run: RunDir, report: Report, metrics: list[Metric], items: list[Item],
          outcomes: dict[str, list[Outcome]], title: str) -> None:
    out = run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    per_example = [m for m in metrics if m.per_example is not None]
    regressed = {r["index"] for r in report.regressed}
    lines = []
    for i, item in enumerate(items):
        lines.append(json.dumps({
            "where": item.where, "prompt": item.messages, "reference": item.reference,
            "outputs": {c: {"text": o[i].output, "stopped": o[i].stopped} for c, o in outcomes.items()},
            "scores": {c: {m.name: m.per_example(o[i]) for m in per_example} for c, o in outcomes.items()},
            **({"json_shape": {c: json_shape(o[i].output, o[i].stopped) for c, o in outcomes.items()}}
               if report.json_shapes else {}),
            "regressed": i in regressed,
        }, ensure_ascii=False))
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    general = out / "general.jsonl"
    if report.general:
        atomic_write_text(general, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in report.general.answers))
    else:
        general.unlink(missing_ok=True)  # a previous report's, not this one's
    write_json(out / "report.json", {
        "run": str(run.root), "examples": report.n, "columns": report.columns, "settings": report.settings.model_dump(mode="json"),
        "metrics": [{"name": r.name, "higher_is_better": r.higher_is_better, "values": r.values,
                     "delta": r.delta, "ci": [r.low, r.high], "significant": r.significant,
                     "improvement": r.improvement} for r in report.rows],
        "gates": [{"metric": g.metric, "required": g.required, "improvement": g.improvement,
                   "passed": g.passed} for g in report.gates],
        "regressed": report.regressed,
        "json_shapes": report.json_shapes,
        "general": general_json(report.general) if report.general else None,
        "served": served_json(report.served) if report.served else None,
    })
    atomic_write_text(out / "report.md", markdown(report, title, report.settings.confidence))
    plot(report, out / "comparison.png", title)
