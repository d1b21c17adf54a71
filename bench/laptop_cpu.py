"""The laptop recipe's training at Qwen3.5-0.8B's full shape on this CPU: before and after.

    python -m bench.laptop_cpu [--steps 4]

A 0.8B-shaped checkpoint (the published config, random bf16 weights, the hub layout; written by
bench/full_size.py's writer) trained at recipes/laptop-qwen3.5-0.8b.yaml's settings (batch 4 ×
accumulation 2, max_length 512, LoRA r 16, gradient checkpointing as preflight decides), on the
demo's support tickets, `--steps` optimizer steps, one process at a time, nothing else running:

  before            what ft did before issue 30: fp32 matmuls, bitsandbytes dequantizing every
                    4-bit weight in every forward and backward (train.cpu_bf16=false,
                    quantization.cpu_dequantized_copies=false), TRL's own LM head for the loss,
                    packing off (as the recipe ships)
  TRL's loss head   as shipped before ft's CPU head (finetune/lm_head.py): the loss scored by
                    TRL's LM head, and the 4-bit layers handing back fp32 (bench/ft_without.py)
  fp32 hand-back    as shipped before the 4-bit layers handed back their bf16 product under
                    autocast (finetune/dequantized.py): they cast it to fp32, as bitsandbytes does
  bf16 adapters     as shipped before ft kept the LoRA weights fp32 on a CPU: TRL's SFTTrainer
                    casts them to bf16 for a quantized model (finetune/train/trainer.py)
  as shipped        the recipe as it is (train.cpu_bf16 auto, kept copies auto, ft's CPU loss
                    head, packing off)
  as shipped, packing on   the same with train.packing=true: the packed path's memory

Timed from ft's metrics.jsonl `elapsed_s` (model loading, the step-0 held-out loss and the first
step's one-time costs left out): the median optimizer step over the steps after the first, and
over every `--repeat` round (the configs run interleaved, round after round: on a shared 2-core
machine the same run varies by ±20% from one minute to the next). Printed: seconds per optimizer
step (median, and the range of the rounds' medians), real tokens/s at the median step, peak
anonymous memory of the process, and what the recipe's whole epoch would take at that speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, per_cpu_kind, python, table, write_result
from bench.full_size import QWEN35_0_8B, recipe_for, write_checkpoint
from finetune.run import RunDir

SETTINGS = ["data.heldout_max=8", "data.max_length=512", "data.too_long=drop", "train.batch_size=4",
            "train.grad_accum=2", "lora.r=16", "lora.alpha=32", "train.save_steps=1000", "train.logging_steps=1",
            "eval.after_train=false", "train.rehearsal=0", "eval.batch_size=8"]
WITHOUT = ("-m", "bench.ft_without")
FT = ("-m", "finetune")
# name → (how ft is started, the settings)
CONFIGS = {"before": ((*WITHOUT, "loss-head,fp32-adapters"), ["train.cpu_bf16=false",
                                                             "quantization.cpu_dequantized_copies=false",
                                                             "train.packing=false"]),
           "TRL's loss head": ((*WITHOUT, "loss-head,bf16-hand-back,fp32-adapters"), ["train.packing=false"]),
           "fp32 hand-back": ((*WITHOUT, "bf16-hand-back,fp32-adapters"), ["train.packing=false"]),
           "bf16 adapters": ((*WITHOUT, "fp32-adapters"), ["train.packing=false"]),
           "as shipped": (FT, ["train.packing=false"]),
           "as shipped, packing on": (FT, ["train.packing=true"])}


def step_times(run: RunDir) -> tuple[list[float], float]:
    """The optimizer steps' durations after the first, and the real tokens a step trained."""
    clock = [(r["step"], r["elapsed_s"], r["num_tokens"]) for r in run.read_metrics() if "elapsed_s" in r]
    durations = [(t1 - t0) / (s1 - s0) for (s0, t0, _), (s1, t1, _) in zip(clock, clock[1:])]
    (s0, _, n0), (s1, _, n1) = clock[0], clock[-1]
    return durations, (n1 - n0) / (s1 - s0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every config, interleaved")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
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
    seen = {name: dict(durations=[], medians=[], tokens_per_step=[], anon=[], rss=[]) for name in args.configs}
    for round_ in range(args.repeat):
        for name in args.configs:
            how, extra = CONFIGS[name]
            out = work / f"{name}-{round_}".replace(" ", "-").replace(",", "").replace("'", "")
            sets = [x for s in [*SETTINGS, f"train.max_steps={args.steps}", f"data.limit={args.steps * 8 + 8}",
                                *extra] for x in ("--set", s)]
            m = measured(python(*how, "train", str(recipe), "--output", str(out), *sets))
            durations, tokens_per_step = step_times(RunDir(out))
            got = seen[name]
            got["durations"] += durations
            got["medians"].append(statistics.median(durations))
            got["tokens_per_step"].append(tokens_per_step)
            got["anon"].append(m["peak_anon_mib"])
            got["rss"].append(m["peak_rss_mib"])
            print(f"round {round_ + 1}, {name}: {statistics.median(durations):.1f} s/step", flush=True)
    results, rows = {}, []
    for name, got in seen.items():
        per_step = statistics.median(got["durations"])
        results[name] = dict(seconds_per_step=round(per_step, 2),
                             round_medians=[round(x, 2) for x in got["medians"]],
                             tokens_per_s=round(statistics.mean(got["tokens_per_step"]) / per_step, 1),
                             peak_anon_mib=round(max(got["anon"])), peak_rss_mib=round(max(got["rss"])),
                             epoch_minutes=round(per_step * epoch_steps / 60, 1))
        r = results[name]
        rows.append([name, r["seconds_per_step"], f"{min(got['medians']):.1f}–{max(got['medians']):.1f}",
                     r["tokens_per_s"], r["peak_anon_mib"], r["peak_rss_mib"], r["epoch_minutes"]])
    print(table(["", "s / step", "rounds", "real tok/s", "peak anon MiB", "peak RSS MiB",
                 f"epoch of {tickets} tickets, min"], rows))
    print(f"\nwritten: {write_result(per_cpu_kind('laptop_cpu'), {'machine': machine(), 'cpu': flags, 'steps': args.steps, 'repeat': args.repeat, 'results': results})}")


if __name__ == "__main__":
    main()
