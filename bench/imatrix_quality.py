"""Calibrated against uncalibrated quantization on a real fine-tune, in the same run, and what
`--quant auto` would choose.

    python -m bench.imatrix_quality [--run RUN] [--quants q4_k_m q3_k_m] [--prompts 32] [--auto q8_0 q4_k_m ...]

RUN is a trained run of a real base (default: recipes/smollm2-support.yaml, trained first). ft's
16-bit file is written once and its importance matrix computed once (as `ft export` does: the
run's training conversations, `export.calibration_tokens`); each type is quantized without and
with it, and each file is scored against the 16-bit file on held-out conversations (top-1 on all
and on decisive positions, mean KL) and on the held-out task metrics `ft eval --gguf` reports
(the 16-bit file's own scores are the fine-tuned model's). Then `--quant auto`'s choice over the
--auto candidates, with its report.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, table, write_result
from bench.verify_calibration import Subject, train_default_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run of a real base (default: train smollm2-support)")
    parser.add_argument("--quants", nargs="+", default=["q4_k_m", "q3_k_m"], help="types compared")
    parser.add_argument("--prompts", type=int, default=32, help="held-out conversations for the logit comparison")
    parser.add_argument("--auto", nargs="*", default=["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "iq4_xs",
                                                      "q3_k_m", "q2_k"], help="--quant auto candidates")
    args = parser.parse_args()

    from eval.columns import GGUFColumn
    from eval.heldout import build_items
    from eval.quant_choice import chooser
    from eval.report import GGUF
    from eval.runner import planned_metrics, run_column
    from export.arches import arch_for
    from export.llama import GGUFModel, native_log
    from export.quantize import quantize
    from export.runner import calibrate
    from export.verify import logit_parity
    from finetune.adapter import base_of_run
    from finetune.loading import prepare

    work = Path(tempfile.mkdtemp(prefix="ft-bench-imatrix-"))
    run_root = args.run or train_default_run(work)
    subject = Subject(run_root, args.prompts)
    recipe = subject.recipe
    log = work / "llama.log"
    f16 = work / "f16.gguf"
    subject.write_16bit(f16, arch_for(subject.info.gguf_arch), subject.cfg, subject.adapter)
    importance, calibration = calibrate(subject.run, recipe, subject.family, subject.tokenizer,
                                        subject.info.template_kwargs, f16, log, print)

    prep = prepare(recipe, base_of_run(subject.run))
    items = build_items(prep.splits.heldout, prep.renderer)
    metrics = planned_metrics(recipe, prep.splits.heldout)
    eot = [prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn]
    n_ctx = max([len(i.input_ids) for i in items] + [len(s) for s in subject.sequences]) + recipe.eval.max_new_tokens + 16

    def task_scores(path: Path) -> dict:
        column = GGUFColumn(GGUF, path, prep.tokenizer, eot, recipe.eval.max_new_tokens, n_ctx)
        try:
            outcomes = run_column(column, items)
        finally:
            column.close()
        return {m.name: round(m.compute(outcomes), 4) for m in metrics}

    with GGUFModel(f16, n_ctx) as model:
        sixteen = np.concatenate([model.logits(ids) for ids in subject.sequences])
    results = {"f16 (the fine-tuned model)": {"size_mib": round(f16.stat().st_size / 2**20, 1),
                                              "task": task_scores(f16)}}
    for quant in args.quants:
        for label, calibrated in (("uncalibrated", None), ("calibrated", importance)):
            path = work / f"{quant}-{label}.gguf"
            with native_log(log):
                quantize(f16, path, quant, importance=calibrated)
            with GGUFModel(path, n_ctx) as model:
                parity = logit_parity(sixteen, model, subject.sequences)
            results[f"{quant} {label}"] = {"size_mib": round(path.stat().st_size / 2**20, 1), "vs_16bit": parity,
                                           "task": task_scores(path)}
            path.unlink()

    names = [m.name for m in metrics]
    rows = []
    for name, r in results.items():
        parity = r.get("vs_16bit")
        rows.append([name, r["size_mib"],
                     *(["—"] * 3 if parity is None else [f"{parity['top1_agreement']:.3f}",
                                                          f"{parity['top1_agreement_decisive']:.3f}",
                                                          f"{parity['kl_mean']:.4f}"]),
                     *(f"{r['task'][n]:.3f}" for n in names)])
    print(table(["file", "MiB", "top-1 vs f16", "decisive top-1", "KL vs f16", *names], rows))

    auto = None
    if args.auto:
        recipe.export.candidates = list(args.auto)

        def quantize_to(candidate: str, target: Path) -> None:
            with native_log(log):
                quantize(f16, target, candidate, importance=importance if candidate != "q8_0" else None)

        quant, chosen, auto = chooser(recipe, prep, work, print)(f16, quantize_to)
        chosen.unlink()
        print(f"--quant auto (tolerance {recipe.export.tolerance}) chooses {quant}")
    write_result("imatrix_quality", {
        "machine": machine(), "run": str(run_root), "base": subject.info.base_model,
        "calibration": calibration, "heldout_examples": len(items), "logit_conversations": len(subject.sequences),
        "positions": int(sixteen.shape[0]), "files": results, "auto": auto})
    print(json.dumps({"work": str(work), "seconds": round(time.monotonic() - START, 1)}))


START = time.monotonic()

if __name__ == "__main__":
    main()
