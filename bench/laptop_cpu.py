"""The laptop recipe's training at Qwen3.5-0.8B's full shape on this CPU: before and after.

    python -m bench.laptop_cpu [--steps 4] [--repeat 2] [--configs NAME ...] [--set KEY=VALUE ...]
    python -m bench.laptop_cpu --tickets 480 [--configs NAME ...]

A 0.8B-shaped checkpoint (the published config, random bf16 weights, the hub layout; written by
bench/full_size.py's writer) trained by recipes/laptop-qwen3.5-0.8b.yaml itself (its system
prompt, batch 4 × accumulation 2, max_length 512, LoRA r 16 and dropout; gradient checkpointing as
preflight decides), pointed at that checkpoint, on the demo's support tickets, `--steps`
optimizer steps (or, with `--tickets N`, a whole epoch of N tickets: the issue's aim is 480 in at
most 12 minutes), one process at a time, nothing else running. The configs: the recipe as
shipped, and as ft or the recipe were before one change or several (the older ones with the
recipe's dropout of then, 0.05):

  before            what ft did before issue 30: fp32 matmuls, bitsandbytes dequantizing every
                    4-bit weight in every forward and backward (train.cpu_bf16=false,
                    quantization.cpu_dequantized_copies=false), TRL's own LM head for the loss,
                    and everything below
  TRL's loss head   the loss scored by TRL's LM head, not ft's (finetune/lm_head.py), the 4-bit
                    layers handing back fp32, and everything below
  fp32 hand-back    the 4-bit layers casting their bf16 product to fp32 under autocast, as
                    bitsandbytes does (finetune/dequantized.py), and everything below
  bf16 adapters     TRL's cast of the LoRA weights to bf16 for a quantized model left in place
                    (finetune/train/trainer.py), and everything below
  previous          as shipped before RESULTS 19: the recipe's LoRA dropout at 0.05, transformers' delta
                    rule and causal conv (finetune/train/linear_attention.py), a step's rows in
                    drawn order
  as in RESULTS 19  as shipped before RESULTS 20: glibc keeping freed blocks up to 1 GiB on its
                    heap (finetune/allocator.py), a step's rows in drawn order, the delta rule's
                    chunk 64, and below
  as in RESULTS 20  as shipped, but every row computing the system prompt's tokens itself
                    (train.shared_prefix=false; finetune/train/shared_prefix.py); RESULTS 21's
                    scan and cast changes kept
  dropout 0.05      as shipped, with the recipe's LoRA dropout at 0.05
  kept freed blocks as shipped, with RESULTS 19's allocator (glibc keeping freed blocks)
  library delta rule      as shipped, with transformers' PyTorch delta rule on padded batches
  chunk 64          as shipped, with ft's delta rule at the model's chunk of 64
  library conv      as shipped, with transformers' PyTorch causal conv on padded batches
  steps unsorted    as shipped, with each step's rows in drawn order, not sorted by length across
                    its 2 micro-batches (finetune/train/order.py)
  grouped by length as shipped, with train.group_by_length (off in the recipe: it costs held-out loss)
  as shipped        the recipe as it is (train.cpu_bf16 auto, kept copies auto, ft's CPU loss
                    head, packing off)
  as shipped, packing on   the same with train.packing=true: the packed path's memory

Timed from ft's metrics.jsonl `elapsed_s` (model loading, the step-0 held-out loss and the first
step's one-time costs left out): the median optimizer step over the steps after the first, and
over every `--repeat` round (the configs run interleaved, round after round: on a shared 2-core
machine the same run varies by ±20% from one minute to the next). Printed: seconds per optimizer
step (median, and the range of the rounds' medians), real tokens/s at the median step, peak
anonymous memory of the process, and what the recipe's whole epoch would take at that speed.
A few steps of a small sample understate what train.group_by_length saves: it sorts within groups
of up to 50 steps' rows, a quarter of the sample when that is smaller (40 tickets: within each
step, as ft does anyway; an epoch of 480: groups of 15 steps, 0.3% padding). `--tickets`
measures the whole epoch instead: training minutes from the first step to the last, the first
step's one-time costs included, the held-out loss before it left out.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, per_cpu_kind, python, table, write_result
from bench.full_size import QWEN35_0_8B, write_checkpoint
from finetune.run import RunDir

SETTINGS = ["data.heldout_max=8", "data.too_long=drop", "train.save_steps=1000", "train.logging_steps=1",
            "eval.after_train=false", "train.rehearsal=0", "eval.batch_size=8"]
WITHOUT = ("-m", "bench.ft_without")
FT = ("-m", "finetune")
EARLIER = ["train.packing=false", "lora.dropout=0.05", "train.shared_prefix=false"]  # the recipe before RESULTS 19
PADDED = ["train.packing=false"]
PER_ROW = [*PADDED, "train.shared_prefix=false"]  # as before RESULTS 21
# name → (how ft is started, the settings)
CONFIGS = {"before": ((*WITHOUT, "loss-head,fp32-adapters,delta-rule,conv,step-sort"),
                      ["train.cpu_bf16=false", "quantization.cpu_dequantized_copies=false", *EARLIER]),
           "TRL's loss head": ((*WITHOUT, "loss-head,bf16-hand-back,fp32-adapters,delta-rule,conv,step-sort"), EARLIER),
           "fp32 hand-back": ((*WITHOUT, "bf16-hand-back,fp32-adapters,delta-rule,conv,step-sort"), EARLIER),
           "bf16 adapters": ((*WITHOUT, "fp32-adapters,delta-rule,conv,step-sort"), EARLIER),
           "previous": ((*WITHOUT, "delta-rule,conv,step-sort"), EARLIER),
           "as in RESULTS 19": ((*WITHOUT, "kept-freed,chunk-64,step-sort"), PER_ROW),
           "as in RESULTS 20": (FT, PER_ROW),
           "dropout 0.05": (FT, [*PADDED, "lora.dropout=0.05"]),
           "kept freed blocks": ((*WITHOUT, "kept-freed"), PADDED),
           "library delta rule": ((*WITHOUT, "delta-rule"), PADDED),
           "chunk 64": ((*WITHOUT, "chunk-64"), PADDED),
           "library conv": ((*WITHOUT, "conv"), PADDED),
           "steps unsorted": ((*WITHOUT, "step-sort"), PADDED),
           "grouped by length": (FT, [*PADDED, "train.group_by_length=true"]),
           "as shipped": (FT, PADDED),
           "as shipped, packing on": (FT, ["train.packing=true"])}


def laptop_recipe_at(work: Path, base: Path) -> Path:
    """recipes/laptop-qwen3.5-0.8b.yaml with its base pointed at the written checkpoint."""
    text = (ROOT / "recipes" / "laptop-qwen3.5-0.8b.yaml").read_text()
    text = re.sub(r"^  base: \S+", f"  base: {base}", text, count=1, flags=re.M)
    path = work / "laptop.yaml"
    path.write_text(text.replace("../datasets", str(ROOT / "datasets")))
    return path


def step_times(run: RunDir) -> tuple[list[float], float]:
    """The optimizer steps' durations after the first, and the real tokens a step trained."""
    clock = [(r["step"], r["elapsed_s"], r["num_tokens"]) for r in run.read_metrics() if "elapsed_s" in r]
    durations = [(t1 - t0) / (s1 - s0) for (s0, t0, _), (s1, t1, _) in zip(clock, clock[1:])]
    (s0, _, n0), (s1, _, n1) = clock[0], clock[-1]
    return durations, (n1 - n0) / (s1 - s0)


def training_seconds(run: RunDir) -> float:
    """From train() to the last step, less the held-out loss computed first (eval_on_start)."""
    records = run.read_metrics()
    first_eval = next(r["eval_runtime"] for r in records if "eval_runtime" in r)
    return max(r["elapsed_s"] for r in records if "elapsed_s" in r) - first_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tickets", type=int, help="train a whole epoch of this many tickets instead of --steps")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every config, interleaved")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting for every config (e.g. train.gradient_checkpointing=true)")
    args = ap.parse_args()
    import torch

    from finetune.recipe import load_recipe

    laptop = load_recipe(ROOT / "recipes" / "laptop-qwen3.5-0.8b.yaml")
    work = Path(tempfile.mkdtemp(prefix="ft-bench-laptop-"))
    base = work / "qwen3.5-0.8b"
    write_checkpoint(base, "tiny-qwen3.5-tied-hub", QWEN35_0_8B, None)
    recipe = laptop_recipe_at(work, base)
    tickets = len((ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines())
    epoch_steps = -(-tickets // (laptop.train.batch_size * laptop.train.grad_accum))
    flags = {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "amx": bool(torch.cpu._is_amx_tile_supported())}
    length = f"an epoch of {args.tickets} tickets" if args.tickets else f"{args.steps} steps"
    print(f"machine: {machine()}\nCPU bf16: {flags}\n0.8B shape, the laptop recipe, {length}\n", flush=True)
    seen = {name: dict(durations=[], medians=[], tokens_per_step=[], anon=[], rss=[], train_s=[])
            for name in args.configs}
    for round_ in range(args.repeat):
        for name in args.configs:
            how, extra = CONFIGS[name]
            out = work / f"{name}-{round_}".replace(" ", "-").replace(",", "").replace("'", "")
            size = [f"data.limit={args.tickets}"] if args.tickets else [f"train.max_steps={args.steps}",
                                                                         f"data.limit={args.steps * 8 + 8}"]
            sets = [x for s in [*SETTINGS, *size, *extra, *args.set] for x in ("--set", s)]
            m = measured(python(*how, "train", str(recipe), "--output", str(out), *sets))
            durations, tokens_per_step = step_times(RunDir(out))
            got = seen[name]
            got["durations"] += durations
            got["medians"].append(statistics.median(durations))
            got["tokens_per_step"].append(tokens_per_step)
            got["anon"].append(m["peak_anon_mib"])
            got["rss"].append(m["peak_rss_mib"])
            got["train_s"].append(training_seconds(RunDir(out)))
            print(f"round {round_ + 1}, {name}: {statistics.median(durations):.1f} s/step, "
                  f"trained {got['train_s'][-1] / 60:.1f} min", flush=True)
    results, rows = {}, []
    for name, got in seen.items():
        per_step = statistics.median(got["durations"])
        results[name] = dict(seconds_per_step=round(per_step, 2),
                             round_medians=[round(x, 2) for x in got["medians"]],
                             tokens_per_s=round(statistics.mean(got["tokens_per_step"]) / per_step, 1),
                             peak_anon_mib=round(max(got["anon"])), peak_rss_mib=round(max(got["rss"])),
                             epoch_minutes=round(per_step * epoch_steps / 60, 1),
                             trained_minutes=[round(x / 60, 2) for x in got["train_s"]])
        r = results[name]
        rows.append([name, r["seconds_per_step"], f"{min(got['medians']):.1f}–{max(got['medians']):.1f}",
                     r["tokens_per_s"], r["peak_anon_mib"], r["peak_rss_mib"],
                     f"{statistics.median(got['train_s']) / 60:.1f}" if args.tickets else r["epoch_minutes"]])
    print(table(["", "s / step", "rounds", "real tok/s", "peak anon MiB", "peak RSS MiB",
                 f"{args.tickets} tickets trained in, min" if args.tickets else f"epoch of {tickets} tickets, min"],
                rows))
    name = f"laptop_cpu_{args.tickets}_tickets" if args.tickets else "laptop_cpu"
    size = {"tickets": args.tickets} if args.tickets else {"steps": args.steps}
    written = write_result(per_cpu_kind(name), {"machine": machine(), "cpu": flags, **size, "repeat": args.repeat,
                                                "settings": args.set, "results": results})
    print(f"\nwritten: {written}")


if __name__ == "__main__":
    main()
