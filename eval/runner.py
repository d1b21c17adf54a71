"""`ft eval RUN`: the same held-out prompts through the base and the fine-tuned model.

Both columns share one copy of the base weights, loaded exactly as training loaded them; the
fine-tuned column is that base with the run's adapter switched on. The base column depends only
on the base, the held-out set and the decoding settings, so it is cached by a hash of those and
reused across fine-tunes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval import general as general_mod
from eval.base_cache import cache_key, read_cached, store
from eval import metrics as metrics_mod
from eval import report as report_mod
from eval import rehearsal as rehearsal_mod
from eval.columns import Column, Generation, GGUFColumn, TransformersColumn
from eval.heldout import Item, build_items, items_digest
from eval.metrics import Outcome
from eval.served import ServedColumn, divergence
from export.checkpoint import Checkpoint, local_snapshot
from export.merge import Adapter
from finetune.data import Example, Splits
from finetune.errors import GateFailed, UserError
from finetune.recipe import Recipe, load_recipe
from finetune.run import RunDir

EVAL_FORMAT = 1  # bump when scoring changes, so cached base columns are recomputed


def scored_heldout(recipe: Recipe, heldout: list[Example]) -> list[Example]:
    """The held-out examples `ft eval` scores (eval.max_examples caps them)."""
    return heldout[: recipe.eval.max_examples]  # None: all


def references_of(recipe: Recipe, heldout: list[Example]) -> list[str]:
    return [e.messages[-1]["content"] for e in scored_heldout(recipe, heldout)]


def planned_metrics(recipe: Recipe, heldout: list[Example]) -> list[metrics_mod.Metric]:
    """The metrics `ft eval` will compute: known from the held-out answers alone, before any
    weights load (so `ft train` can refuse a gate on a metric that will not exist)."""
    scored = scored_heldout(recipe, heldout)
    references = references_of(recipe, heldout)
    if recipe.eval.metrics == "auto":
        return metrics_mod.detect_metrics(references, all(e.label is not None for e in scored))
    try:
        chosen = metrics_mod.by_name(list(recipe.eval.metrics), references)
    except KeyError as exc:
        raise UserError(f"unknown metric {exc}", "eval.metrics",
                        f"use auto or names from: {', '.join(metrics_mod.KNOWN)}") from None
    # a json.<key>.* metric on a key no reference has would score every model zero
    keys = {k for r in references if (parsed := metrics_mod.parse_json_object(r)) for k in parsed}
    absent = [m.name for m in chosen if m.name.startswith("json.") and m.name.split(".")[1] not in keys]
    if absent:
        raise UserError(f"{', '.join(absent)} scores a JSON key no held-out answer has", "eval.metrics",
                        f"the held-out answers' keys are: {', '.join(sorted(keys)) or 'none (not JSON)'}")
    return chosen


def check_required(recipe: Recipe, metrics: list[metrics_mod.Metric], references: list[str],
                   where: str = "eval.require") -> None:
    general = general_mod.planned_keys(recipe, references)
    unknown = sorted(set(recipe.eval.require) - {m.name for m in metrics} - set(general))
    if unknown:
        how = "chosen from the held-out answers (eval.metrics: auto)" if recipe.eval.metrics == "auto" else "listed"
        raise UserError(f"a gate names a metric this evaluation does not compute: {', '.join(unknown)}", where,
                        f"the metrics {how} are: {', '.join(m.name for m in metrics)}"
                        + (f"; the general section's: {', '.join(general)}" if general else ""))


def check_before_training(recipe: Recipe, splits: Splits) -> str:
    """`ft train` and `ft validate` call this before any weights load: the metrics and the gates
    must be computable, or the run would train for nothing (finetune cannot import eval, so the
    CLI hands it over)."""
    metrics = planned_metrics(recipe, splits.heldout)
    check_required(recipe, metrics, references_of(recipe, splits.heldout))
    general_mod.read_benchmarks(recipe)
    rehearsal = rehearsal_mod.check(recipe, splits)
    gates = ", ".join(f"{k} {v:+g}" for k, v in recipe.eval.require.items())
    return (f"eval: {', '.join(m.name for m in metrics)} on {len(splits.heldout)} held-out examples"
            + (f"; gates {gates}" if gates else "") + (f"; {rehearsal}" if rehearsal else ""))


def run_column(column: Column, items: list[Item]) -> list[Outcome]:
    losses = column.score(items)
    answers = column.generate(items)
    return [Outcome(i.reference, a.text, a.stopped, nll, n) for i, a, (nll, n) in zip(items, answers, losses)]


def base_identity(path: str) -> list:
    """What the base weights are: file names, sizes and mtimes for a folder; the id otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns]
                  for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))


def base_cache_key(recipe: Recipe, base_path: str, items: list[Item]) -> str:
    return cache_key([EVAL_FORMAT, base_identity(base_path), recipe.model.revision, recipe.quantization.model_dump(),
                      recipe.eval.max_new_tokens, items_digest(items)])


def shipped_gguf(run: RunDir, recipe: Recipe) -> Path:
    """The exported file: the recipe's quant if present, else the newest verified export."""
    preferred = run.export_dir / f"{recipe.name}-{recipe.export.quant}.gguf"
    found = sorted((p for p in run.export_dir.glob(f"{recipe.name}-*.gguf") if "FAILED" not in p.name),
                   key=lambda p: p.stat().st_mtime)
    if preferred.is_file():
        return preferred
    if found:
        return found[-1]
    raise UserError(f"no exported GGUF in {run.export_dir}", "--gguf", f"run `ft export {run.root}` first")


@dataclass
class ServedRequest:
    """ft eval --served: where the application's server is, and how hard to ask it."""

    url: str
    model: str | None = None  # None: the one model the server lists
    concurrency: int = 1
    timeout_s: float = 300.0
    extra_fields: dict = field(default_factory=dict)  # --request-field: added to every request body


def evaluate(run: RunDir, overrides: list[str] = (), use_cache: bool = True, gguf: bool = False,
             progress=lambda line: None, served: ServedRequest | None = None) -> report_mod.Report:
    from peft import PeftModel

    from finetune.adapter import base_of_run
    from finetune.loading import load_base_model, prepare

    if not (run.adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"the run has no trained adapter: {run.adapter}", str(run.root),
                        "finish training first (ft train RECIPE, or --resume)")
    recipe = load_recipe(run.recipe, overrides)
    # the served column is compared with the shipped file's answers: it brings the GGUF column
    gguf_path = shipped_gguf(run, recipe) if gguf or served else None  # fail before any model work
    prep = prepare(recipe, base_of_run(run))
    heldout = scored_heldout(recipe, prep.splits.heldout)
    items = build_items(heldout, prep.renderer)
    metrics = planned_metrics(recipe, heldout)
    check_required(recipe, metrics, [i.reference for i in items])
    benchmarks = general_mod.read_benchmarks(recipe)  # before the weights load: a bad row fails fast
    eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
    served_column = None
    if served:  # the server answers, speaks the API and has the model: checked before weights load
        served_column = ServedColumn(report_mod.SERVED, served.url, served.model, prep.tokenizer,
                                     recipe.eval.max_new_tokens, served.concurrency, served.timeout_s,
                                     served.extra_fields)

    base_dir = local_snapshot(prep.base.path, recipe.model.revision)
    Adapter(run.adapter).check(Checkpoint.open(base_dir), base_dir)  # a run from another base: clear error
    model = PeftModel.from_pretrained(load_base_model(recipe, prep.base), str(run.adapter))
    model.eval()
    common = dict(tokenizer=prep.tokenizer, end_of_turn_ids=eot, batch_size=recipe.eval.batch_size,
                  max_new_tokens=recipe.eval.max_new_tokens)
    key = base_cache_key(recipe, prep.base.path, items)
    rows = read_cached("base", key) if use_cache else None
    base = [Outcome(**o) for o in rows] if rows is not None else None
    cached = base is not None
    if base is None:
        base = run_column(TransformersColumn(report_mod.BASE, model, adapter=False, **common), items)
        store("base", key, [asdict(o) for o in base])
    tuned = run_column(TransformersColumn(report_mod.TUNED, model, adapter=True, **common), items)
    outcomes = {report_mod.BASE: base, report_mod.TUNED: tuned}
    if gguf_path:
        n_ctx = max(len(i.input_ids) for i in items) + recipe.eval.max_new_tokens + 16
        column = GGUFColumn(report_mod.GGUF, gguf_path, prep.tokenizer, eot, recipe.eval.max_new_tokens, n_ctx)
        try:
            outcomes[report_mod.GGUF] = run_column(column, items)
        finally:
            column.close()
    served_section = None
    if served_column:
        progress(f"served: {len(items)} held-out prompts to {served_column.model} at {served_column.base_url}, "
                 f"{served_column.concurrency} at once")
        answers = served_column.generate(items)
        outcomes[report_mod.SERVED] = [Outcome(i.reference, a.text, a.stopped, 0.0, 0) for i, a in zip(items, answers)]
        gguf_answers = [Generation(o.output, o.stopped) for o in outcomes[report_mod.GGUF]]
        served_section = report_mod.Served(
            served_column.base_url, served_column.model, served_column.extra_fields,
            report_mod.served_rows(metrics, outcomes, recipe.eval.bootstrap_samples, recipe.eval.confidence),
            divergence(items, gguf_answers, answers, list(prep.base.family.end_of_turn)), served_column.speed)

    general = None
    if recipe.eval.general.enabled:
        general = general_mod.evaluate_general(recipe, model, prep, [i.reference for i in items],
                                               base_identity(prep.base.path), benchmarks, use_cache, progress)
    report = report_mod.compare(metrics, outcomes, recipe.eval.require, recipe.eval.bootstrap_samples,
                                recipe.eval.confidence, general, served_section)
    report.regressed = report_mod.regressions(metrics, items, outcomes)
    report.settings = report_mod.EvalSettings(
        max_new_tokens=recipe.eval.max_new_tokens, bootstrap_samples=recipe.eval.bootstrap_samples,
        confidence=recipe.eval.confidence, base_column_cached=cached, base_cache_key=key,
        template_kwargs=prep.template_kwargs, gguf=str(gguf_path) if gguf_path else None,
        served_url=served_column.base_url if served_column else None,
        served_model=served_column.model if served_column else None)
    report_mod.write(run, report, metrics, items, outcomes, recipe.name)
    return report


def check_gates(report: report_mod.Report) -> None:
    failed = [g.message() for g in report.gates if not g.passed]
    if failed:
        raise GateFailed(failed)
