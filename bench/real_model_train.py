"""Training a real model on a CPU: ft against the LoRA loop a CPU user writes by hand.

    python -m bench.real_model_train [--steps 30]

SmolLM2-135M-Instruct (the packaged base), the support set, recipes/smollm2-support.yaml's
settings (r 16 on every linear layer, lr 1e-3, 8 examples a step). Contenders, each in its own
process, on the same examples (a training file of exactly steps × batch tickets, each used once)
for the same optimizer steps:

  ft                      the recipe as shipped: 4-bit base, packing, TRL's trainer
  ft, 16-bit base         the same with quantization.load_in_4bit: false
  plain peft loop, fp32   bench/plain_lora_loop.py: fp32 model, padded batches, HF's loss

Real (non-pad) tokens per second of training, peak RSS, and the held-out loss of every adapter on
the 60 held-out tickets, each on the base it was trained against (4-bit or fp32), by one evaluator
with ft's label masks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from finetune.run import RunDir
from bench.common import ROOT, machine, measured, python, table, write_result

RECIPE = ROOT / "recipes" / "smollm2-support.yaml"


def bench_recipe(work: Path, steps: int) -> Path:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["name"] = "bench-real"
    recipe["data"]["train"] = str(work / "train.jsonl")
    recipe["data"]["heldout"] = str(ROOT / "datasets" / "support" / "heldout.jsonl")
    recipe["train"].update(max_steps=steps, save_steps=100_000, rehearsal=0)  # the contenders' rows
    recipe["eval"]["after_train"] = False
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def heldout_loss(recipe_path: Path, adapter: Path, four_bit: bool) -> float:
    """Mean loss per trained held-out token (ft's masks), the adapter on its own base precision."""
    from peft import PeftModel

    from eval.columns import TransformersColumn
    from eval.heldout import build_items
    from finetune.recipe import load_recipe
    from finetune.loading import load_base_model, prepare

    recipe = load_recipe(recipe_path, [f"quantization.load_in_4bit={str(four_bit).lower()}"])
    prep = prepare(recipe)
    items = build_items(prep.splits.heldout, prep.renderer)
    model = PeftModel.from_pretrained(load_base_model(recipe, prep.base), str(adapter)).eval()
    scores = TransformersColumn("x", model, prep.tokenizer, [], 16, 1).score(items)
    return sum(nll for nll, _ in scores) / sum(n for _, n in scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from finetune.bases import resolve_base
    from finetune.recipe import load_recipe
    from finetune.loading import lora_targets

    work = Path(tempfile.mkdtemp(prefix="ft-bench-real-"))
    shipped = load_recipe(RECIPE)
    batch = shipped.train.batch_size
    lines = (ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines()[: args.steps * batch]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    recipe_path = bench_recipe(work, args.steps)
    base = resolve_base(shipped.model.base)
    targets = ",".join(lora_targets(shipped, base.family))
    print(f"machine: {machine()}\n{base.name}: {base.weights}\n{args.steps} steps x {batch} tickets\n")

    results = {}
    for name, extra, four_bit in (("ft", [], True),
                                  ("ft, 16-bit base", ["--set", "quantization.load_in_4bit=false"], False)):
        out = work / name.replace(" ", "").replace(",", "-")
        m = measured(python("-m", "finetune", "train", str(recipe_path), "--output", str(out), *extra))
        summary, tokens = RunDir(out).read_manifest().summary, RunDir(out).trained_tokens()
        results[name] = dict(runtime=summary.train_runtime_s, tokens=int(tokens), rss=m["peak_rss_mib"],
                             adapter=out / "adapter", four_bit=four_bit)
    out = work / "plain"
    m = measured(python("-m", "bench.plain_lora_loop", base.path, str(work / "train.jsonl"),
                        shipped.data.system_prompt, str(out), "--steps", str(args.steps), "--batch-size", str(batch),
                        "--lr", str(shipped.train.lr), "--warmup-ratio", str(shipped.train.warmup_ratio),
                        "--targets", targets))
    line = json.loads(m["output"].strip().splitlines()[-1])
    results["plain peft loop, fp32"] = dict(runtime=line["train_runtime_s"], tokens=int(line["tokens"]),
                                            rss=m["peak_rss_mib"], adapter=out, four_bit=False)

    plain_tps = results["plain peft loop, fp32"]["tokens"] / results["plain peft loop, fp32"]["runtime"]
    rows, record = [], {"machine": machine(), "base": base.name, "weights": base.weights, "steps": args.steps,
                        "batch_size": batch, "contenders": {}}
    for name, r in results.items():
        tps = r["tokens"] / r["runtime"]
        loss = heldout_loss(recipe_path, r["adapter"], r["four_bit"])
        rows.append([name, r["tokens"], r["runtime"], tps, r["rss"], loss, tps / plain_tps])
        record["contenders"][name] = dict(real_tokens=r["tokens"], train_runtime_s=round(r["runtime"], 2),
                                          real_tokens_per_s=round(tps, 1), peak_rss_mib=round(r["rss"]),
                                          heldout_loss=round(loss, 4), speed_vs_plain=round(tps / plain_tps, 3))
    print(table(["contender", "real tokens", "train s", "real tok/s", "peak RSS MiB", "held-out loss",
                 "speed vs plain loop"], rows))
    print(f"\nwritten: {write_result('real_model_train', record)}")


if __name__ == "__main__":
    main()
