"""Training on a CPU: ft as shipped against Unsloth's CPU backend, the plain peft loop and TRL's docs script.

    python -m bench.cpu_peers [--steps 30] [--unsloth-venv DIR] [--loss-seeds 1 2]

The README demo's settings (SmolLM2-135M-Instruct, the packaged base; LoRA r 16, alpha 32 on every
linear layer; lr 1e-3, cosine, 5% warmup; 8 tickets a step), on the same tickets: the first
steps × 8 of the demo's training set, each used once. Every contender in its own process, one
after the other, nothing else running:

  ft                       `ft train recipes/smollm2-support.yaml` as shipped (4-bit base, packing,
                           TRL's trainer, train.cpu_bf16 auto, kept dequantized copies), rehearsal
                           off so that every contender trains on the same rows
  ft, TRL's loss head      the same with the loss scored by TRL's own LM head instead of ft's CPU
                           head (finetune/lm_head.py; bench/ft_without.py loss-head)
  ft, fp32 hand-back       the same with the 4-bit layers casting their bf16 product back to fp32
                           as bitsandbytes does (finetune/dequantized.py; bench/ft_without.py
                           bf16-hand-back)
  ft, no kept copies       the same with quantization.cpu_dequantized_copies=false: bitsandbytes
                           dequantizing every 4-bit weight in every forward and backward
  ft before issue 30       all of these off, LoRA weights in bf16 as TRL casts them, and fp32
                           (train.cpu_bf16=false): what ft was before
                           (on a CPU without native bf16, the floor: "never slower than today")
  ft, 16-bit base          quantization.load_in_4bit=false: the plain loop's base, so its held-out
                           loss is comparable with the loop's (a 4-bit base costs ~0.03 nats here)
  Unsloth CPU backend      bench/unsloth_cpu.py in Unsloth's own venv (UNSLOTH_FORCE_CPU=1), as its
                           docs write a LoRA SFT; the venv is made on first use:
                           python3 -m venv DIR && DIR/bin/pip install unsloth==2026.10.9
                           (it pulls torch 2.14.1, which pip takes from this machine's disk)
  plain peft loop, fp32    bench/plain_lora_loop.py: what a CPU user writes by hand
  TRL docs script          bench/trl_baseline.py: QLoRA through SFTTrainer with TRL's defaults

Printed: the CPU's bf16 support, each contender's precision, real (non-pad) tokens per second of
training (each trainer's own train_runtime; ft's held-out loss at step 0, which the others do not
compute, taken out), peak RSS, and the held-out loss of every adapter on the
60 held-out tickets by one evaluator (ft's label masks, each adapter on the base it trained
against: the 4-bit base, or fp32 for the plain loop); then ft's ratio to each. `--loss-seeds`:
ft as shipped and the plain loop trained again at these seeds (LoRA initialisation and example
order), untimed, for the mean held-out loss of each over all its seeds: 30 steps from one seed
vary by ±0.03 nats, more than the difference the comparison asks about.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, measured, per_cpu_kind, python, table, write_result
from bench.real_model_train import bench_recipe, heldout_loss
from finetune.run import RunDir

UNSLOTH = "unsloth==2026.10.9"
DEFAULT_VENV = Path.home() / ".cache" / "ft-bench" / "unsloth-2026.10.9"


def unsloth_python(venv: Path) -> Path:
    """Unsloth's own venv (its torch and TRL differ from ft's), made on first use."""
    exe = venv / "bin" / "python"
    if not exe.exists():
        print(f"setting up Unsloth's venv at {venv} (pip install {UNSLOTH}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", UNSLOTH], check=True)
    return exe


def trl_rows(work: Path, tickets: list[str], system: str) -> Path:
    """The same tickets in TRL's conversational prompt-completion shape (loss on the answer only)."""
    path = work / "prompt_completion.jsonl"
    with path.open("w") as out:
        for line in tickets:
            turns = json.loads(line)["messages"]
            prompt = [{"role": "system", "content": system}] + [m for m in turns[:-1] if m["role"] != "system"]
            out.write(json.dumps({"prompt": prompt, "completion": [turns[-1]]}) + "\n")
    return path


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--unsloth-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--loss-seeds", type=int, nargs="*", default=[1, 2],
                    help="more seeds for ft's and the plain loop's held-out loss (untimed)")
    args = ap.parse_args()
    import torch

    from finetune.bases import resolve_base
    from finetune.loading import lora_targets, native_bf16_cpu
    from finetune.recipe import load_recipe

    unsloth = unsloth_python(args.unsloth_venv)
    work = Path(tempfile.mkdtemp(prefix="ft-bench-cpu-peers-"))
    shipped = load_recipe(ROOT / "recipes" / "smollm2-support.yaml")
    batch, lr, warmup = shipped.train.batch_size, shipped.train.lr, shipped.train.warmup_ratio
    tickets = (ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines()[: args.steps * batch]
    (work / "train.jsonl").write_text("\n".join(tickets) + "\n")
    recipe_path = bench_recipe(work, args.steps)
    pc = trl_rows(work, tickets, shipped.data.system_prompt)
    base = resolve_base(shipped.model.base)
    targets = ",".join(lora_targets(shipped, base.family))
    flags = {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
             "amx": bool(torch.cpu._is_amx_tile_supported())}
    ft_precision = "bf16 autocast" if native_bf16_cpu() else "fp32"
    print(f"machine: {machine()}\nCPU bf16: {flags}\n{base.name}: {base.weights}\n"
          f"{args.steps} steps x {batch} tickets, LoRA r 16 on {targets}\n", flush=True)

    # untimed: the first training process on a fresh machine runs measurably slower (files, caches)
    measured(python("-m", "finetune", "train", str(recipe_path), "--output", str(work / "warm-up"),
                    "--set", "train.max_steps=2"))
    results = {}
    ft, without = ("-m", "finetune"), ("-m", "bench.ft_without")
    for name, how, extra in (("ft", ft, []),
                             ("ft, TRL's loss head", (*without, "loss-head"), []),
                             ("ft, fp32 hand-back", (*without, "bf16-hand-back"), []),
                             ("ft, no kept copies", ft, ["--set", "quantization.cpu_dequantized_copies=false"]),
                             ("ft before issue 30", (*without, "loss-head,bf16-hand-back,fp32-adapters"),
                              ["--set", "quantization.cpu_dequantized_copies=false", "--set", "train.cpu_bf16=false"]),
                             ("ft, 16-bit base", ft, ["--set", "quantization.load_in_4bit=false"])):
        out = work / name.replace(" ", "-").replace(",", "").replace("'", "")
        m = measured(python(*how, "train", str(recipe_path), "--output", str(out), *extra))
        run = RunDir(out)
        summary = run.read_manifest().summary
        evaluations = [r["eval_runtime"] for r in run.read_metrics() if "eval_runtime" in r]
        # the held-out loss at step 0 runs inside the Trainer's clock; the last one, after train()
        # returns (runner.finish), outside it already
        seconds = summary.train_runtime_s - sum(evaluations[:-1])
        four_bit = "load_in_4bit=false" not in " ".join(extra)
        precision = "fp32" if "train.cpu_bf16=false" in extra else ft_precision
        results[name] = dict(runtime=seconds, tokens=int(run.trained_tokens()), rss=m["peak_rss_mib"],
                             wall=m["wall_s"], adapter=out / "adapter", four_bit=four_bit,
                             precision=precision + (", 4-bit base" if four_bit else ", fp32 base"))
        print(f"{name}: {seconds:.1f} s", flush=True)

    m = measured([str(unsloth), str(ROOT / "bench" / "unsloth_cpu.py"), str(pc), base.path, str(work / "unsloth"),
                  "--steps", str(args.steps), "--batch-size", str(batch), "--lr", str(lr),
                  "--warmup-ratio", str(warmup), "--targets", targets],
                 env={"UNSLOTH_FORCE_CPU": "1", "PYTHONPATH": ""})
    line = last_json(m["output"])
    results["Unsloth CPU backend"] = dict(runtime=line["train_runtime_s"], tokens=int(line["tokens"]),
                                          rss=m["peak_rss_mib"], wall=m["wall_s"], adapter=work / "unsloth",
                                          four_bit=True, precision=("bf16 autocast" if line["bf16"] else "fp32")
                                          + f", 4-bit base ({line['dtype']}), torch {line['torch']}")
    print(f"Unsloth: {line['train_runtime_s']:.1f} s", flush=True)

    m = measured(python("-m", "bench.plain_lora_loop", base.path, str(work / "train.jsonl"), shipped.data.system_prompt,
                        str(work / "plain"), "--steps", str(args.steps), "--batch-size", str(batch), "--lr", str(lr),
                        "--warmup-ratio", str(warmup), "--targets", targets))
    line = last_json(m["output"])
    results["plain peft loop"] = dict(runtime=line["train_runtime_s"], tokens=int(line["tokens"]), rss=m["peak_rss_mib"],
                                      wall=m["wall_s"], adapter=work / "plain", four_bit=False, precision="fp32, fp32 base")

    m = measured(python("-m", "bench.trl_baseline", str(pc), base.path, str(work / "trl"), "--steps", str(args.steps),
                        "--batch-size", str(batch), "--lr", str(lr), "--targets", targets))
    line = last_json(m["output"])
    results["TRL docs script"] = dict(runtime=line["train_runtime_s"], tokens=int(line["tokens"]), rss=m["peak_rss_mib"],
                                      wall=m["wall_s"], adapter=work / "trl", four_bit=True,
                                      precision=("bf16 autocast" if line["bf16"] else "fp32") + ", 4-bit base"
                                      + (", gradient checkpointing" if line["gradient_checkpointing"] else ""))

    # one evaluator, once per adapter; the timed runs are the first seed of ft's and the loop's lists
    losses = {name: heldout_loss(recipe_path, r["adapter"], r["four_bit"]) for name, r in results.items()}
    seeds = {"ft": {f"seed {shipped.train.seed}": losses["ft"]},
             "plain peft loop": {"seed 0": losses["plain peft loop"]}}  # plain_lora_loop's default seed
    for seed in args.loss_seeds:
        out = work / f"ft-seed{seed}"
        measured(python("-m", "finetune", "train", str(recipe_path), "--output", str(out), "--set", f"train.seed={seed}"))
        seeds["ft"][f"seed {seed}"] = heldout_loss(recipe_path, out / "adapter", True)
        out = work / f"plain-seed{seed}"
        measured(python("-m", "bench.plain_lora_loop", base.path, str(work / "train.jsonl"), shipped.data.system_prompt,
                        str(out), "--steps", str(args.steps), "--batch-size", str(batch), "--lr", str(lr),
                        "--warmup-ratio", str(warmup), "--targets", targets, "--seed", str(seed)))
        seeds["plain peft loop"][f"seed {seed}"] = heldout_loss(recipe_path, out, False)

    ft_tps = results["ft"]["tokens"] / results["ft"]["runtime"]
    rows, record = [], {"machine": machine(), "cpu": flags, "steps": args.steps, "batch_size": batch,
                        "targets": targets, "contenders": {}}
    for name, r in results.items():
        tps = r["tokens"] / r["runtime"]
        loss = losses[name]
        rows.append([name, r["precision"], r["tokens"], r["runtime"], tps, r["wall"], r["rss"], loss, ft_tps / tps])
        record["contenders"][name] = dict(precision=r["precision"], real_tokens=r["tokens"],
                                          train_runtime_s=round(r["runtime"], 2), real_tokens_per_s=round(tps, 1),
                                          process_wall_s=round(r["wall"], 1), peak_rss_mib=round(r["rss"]),
                                          heldout_loss=round(loss, 4), ft_speed_ratio=round(ft_tps / tps, 3))
    print(table(["contender", "precision", "real tokens", "train s", "real tok/s", "process s", "peak RSS MiB",
                 "held-out loss", "ft ×"], rows))
    means = {name: sum(v.values()) / len(v) for name, v in seeds.items()}
    record["heldout_loss_by_seed"] = {name: {k: round(x, 4) for k, x in v.items()} for name, v in seeds.items()}
    print("\nheld-out loss by seed: " + "; ".join(
        f"{name}: {', '.join(f'{x:.4f}' for x in v.values())} (mean {means[name]:.4f})" for name, v in seeds.items()))
    print(f"ft's mean minus the plain loop's: {means['ft'] - means['plain peft loop']:+.4f} nats")
    print(f"\nwritten: {write_result(per_cpu_kind('cpu_peers'), record)}")


if __name__ == "__main__":
    main()
