"""`ft export --quant auto`: the smallest GGUF whose held-out task metrics stay within a tolerance
of the fine-tuned model's, decided by the paired bootstrap interval.

The fine-tuned model's answers are the verified 16-bit file's (same engine as the candidates, so
a difference is quantization and nothing else; verification shows that file computes the
fine-tuned model's logits). Each candidate, largest first, is quantized with the run's importance
matrix, answers the same held-out prompts greedily, and passes when, for every task metric, the
lower end of the interval of (candidate − fine-tuned) is no lower than −tolerance: "at most a
point worse, with 95% confidence", not "not shown to be worse". Token loss and perplexity are
reported, not gated: every quantization raises them a little. All candidates are scored (smaller
is not always worse: SmolLM2's q5_k_m is further from its 16-bit file than its q4_k_m).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from eval import metrics as metrics_mod
from eval.columns import GGUFColumn
from eval.heldout import build_items
from eval.report import GGUF
from eval.runner import planned_metrics, run_column, scored_heldout
from eval.stats import paired_bootstrap
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.run import write_json

REPORTED_ONLY = ("loss", "perplexity")  # every quantization raises them a little: reported, not gated


def task_metrics(metrics: list[metrics_mod.Metric]) -> list[metrics_mod.Metric]:
    return [m for m in metrics if m.name not in REPORTED_ONLY]


def candidate_row(metrics, reference, outcomes, recipe: Recipe) -> dict:
    rows, within = {}, True
    for metric in metrics:
        delta, low, high = paired_bootstrap(metric, reference, outcomes, recipe.eval.bootstrap_samples,
                                            recipe.eval.confidence)
        gated = metric.name not in REPORTED_ONLY
        worst = low if metric.higher_is_better else -high  # the interval's worse end, better = up
        ok = not gated or worst >= -recipe.export.tolerance
        within &= ok
        rows[metric.name] = {"value": metric.compute(outcomes), "delta": delta, "low": low, "high": high,
                             "gated": gated, "within": ok}
    return {"metrics": rows, "within": within}


def chooser(recipe: Recipe, prep, out: Path, progress=print) -> Callable:
    """What export_run's `choose_quant(prep)` returns: (sixteen-bit path, quantize_to) → (quant, path,
    report). `prep`: the run's data as export read it (once, for every step)."""

    def choose(sixteen: Path, quantize_to) -> tuple[str, Path, dict]:
        heldout = scored_heldout(recipe, prep.splits.heldout)
        items = build_items(heldout, prep.renderer)
        metrics = planned_metrics(recipe, prep.splits.heldout)
        eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
        n_ctx = max(len(i.input_ids) for i in items) + recipe.eval.max_new_tokens + 16

        def answers(path: Path) -> list:
            column = GGUFColumn(GGUF, path, prep.tokenizer, eot, recipe.eval.max_new_tokens, n_ctx)
            try:
                return run_column(column, items)
            finally:
                column.close()

        progress(f"auto: the 16-bit file answers {len(items)} held-out prompts (the fine-tuned model's answers)")
        reference = answers(sixteen)
        values = {m.name: m.compute(reference) for m in metrics}
        report = {"tolerance": recipe.export.tolerance, "confidence": recipe.eval.confidence,
                  "examples": len(items), "fine_tuned": {"size": sixteen.stat().st_size, "metrics": values},
                  "candidates": {}}
        best: tuple[str, Path] | None = None
        for quant in recipe.export.candidates:
            path = out / f".auto-{quant}.gguf.partial"
            quantize_to(quant, path)
            row = candidate_row(metrics, reference, answers(path), recipe)
            row["size"] = path.stat().st_size
            report["candidates"][quant] = row
            progress(f"auto: {quant} {row['size'] / 2**20:,.1f} MiB "
                     + " ".join(f"{n} {r['value']:.3f}" for n, r in row["metrics"].items())
                     + (" within" if row["within"] else " outside") + " tolerance")
            if row["within"] and (best is None or row["size"] < best[1].stat().st_size):
                if best:
                    best[1].unlink()
                best = (quant, path)
            else:
                path.unlink()
        report["chosen"] = best[0] if best else None
        write_json(out / "quant_auto.json", report)
        if best is None:
            raise UserError(f"no candidate of {', '.join(recipe.export.candidates)} stays within "
                            f"{recipe.export.tolerance} of the fine-tuned model on every task metric "
                            f"(scores in {out / 'quant_auto.json'})", "export.tolerance",
                            "raise export.tolerance, add larger types to export.candidates, or name a type "
                            "with --quant (f16 ships the fine-tuned model unquantized)")
        return best[0], best[1], report

    return choose

