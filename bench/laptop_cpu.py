"""The laptop recipe's training at Qwen3.5-0.8B's full shape on this CPU: before and after.

    python -m bench.laptop_cpu [--steps 4]

A 0.8B-shaped checkpoint (the published config, random bf16 weights, the hub layout; written by
bench/full_size.py's writer) trained at recipes/laptop-qwen3.5-0.8b.yaml's settings (batch 4 ×
accumulation 2, max_length 512, LoRA r 16, gradient checkpointing as preflight decides), on the
demo's support tickets, `--steps` optimizer steps, one process at a time, nothing else running:

  before            what ft did before issue 30: fp32 matmuls, bitsandbytes dequantizing every
                    4-bit weight in every forward and backward (train.cpu_bf16=false,
                    quantization.cpu_dequantized_copies=false), packing off (as the recipe ships)
  as shipped        the recipe as it is (train.cpu_bf16 auto, kept copies auto, packing off)
  as shipped, packing on   the same with train.packing=true: the packed path's memory

Timed from the first step's log to the last (ft's metrics.jsonl `elapsed_s`: model loading, the
step-0 held-out loss and the first step's one-time costs left out). Printed: seconds per optimizer
step, real tokens/s, peak anonymous memory of the process, and what the recipe's whole epoch would
take at that speed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, python, table, write_result
from bench.full_size import QWEN35_0_8B, recipe_for, write_checkpoint
from finetune.run import RunDir

SETTINGS = ["data.heldout_max=8", "data.max_length=512", "data.too_long=drop", "train.batch_size=4",
            "train.grad_accum=2", "lora.r=16", "lora.alpha=32", "train.save_steps=1000", "train.logging_steps=1",
            "eval.after_train=false", "train.rehearsal=0", "eval.batch_size=8"]
CONFIGS = {"before": ["train.cpu_bf16=false", "quantization.cpu_dequantized_copies=false", "train.packing=false"],
           "as shipped": ["train.packing=false"],
           "as shipped, packing on": ["train.packing=true"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import torch

    from finetune.recipe import load_recipe

    laptop = load_recipe(ROOT / "recipes" / "laptop-qwen3.5-0.8b.yaml")
    work = Path(tempfile.mkdtemp(prefix="ft-bench-laptop-"))
    base = work / "qwen3.5-0.8b"
    write_checkpoint(base, "tiny-qwen3.5-tied-hub", QWEN35_0_8B, None)
    recipe = recipe_for(work, base, "laptop-bench")
    tickets = len((ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines())
    epoch_steps = -(-tickets // (laptop.train.batch_size * laptop.train.grad_accum))
    flags = {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "amx": bool(torch.cpu._is_amx_tile_supported())}
    print(f"machine: {machine()}\nCPU bf16: {flags}\n0.8B shape, {args.steps} steps of 4 × 2, max_length 512\n",
          flush=True)
    results, rows = {}, []
    for name, extra in CONFIGS.items():
        out = work / name.replace(" ", "-").replace(",", "")
        sets = [x for s in [*SETTINGS, f"train.max_steps={args.steps}", f"data.limit={args.steps * 8 + 8}", *extra]
                for x in ("--set", s)]
        m = measured(python("-m", "finetune", "train", str(recipe), "--output", str(out), *sets))
        clock = [(r["step"], r["elapsed_s"], r["num_tokens"]) for r in RunDir(out).read_metrics() if "elapsed_s" in r]
        (s0, t0, n0), (s1, t1, n1) = clock[0], clock[-1]
        per_step = (t1 - t0) / (s1 - s0)
        results[name] = dict(seconds_per_step=round(per_step, 2), tokens_per_s=round((n1 - n0) / (t1 - t0), 1),
                             peak_anon_mib=round(m["peak_anon_mib"]), peak_rss_mib=round(m["peak_rss_mib"]),
                             epoch_minutes=round(per_step * epoch_steps / 60, 1))
        r = results[name]
        rows.append([name, r["seconds_per_step"], r["tokens_per_s"], r["peak_anon_mib"], r["peak_rss_mib"],
                     r["epoch_minutes"]])
        print(f"{name}: {per_step:.1f} s/step", flush=True)
    print(table(["", "s / step", "real tok/s", "peak anon MiB", "peak RSS MiB",
                 f"epoch of {tickets} tickets, min"], rows))
    print(f"\nwritten: {write_result('laptop_cpu', {'machine': machine(), 'cpu': flags, 'steps': args.steps, 'results': results})}")


if __name__ == "__main__":
    main()
