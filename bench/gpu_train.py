"""GPU training: ft (hf backend), ft (unsloth backend) and the TRL-docs QLoRA script, one run.

    python -m bench.gpu_train [--size full|tiny] [--layers N] [--steps 30] [--batch-size 8] [--out FILE]

`--size full` (the default, for a GPU): a Qwen3.5-9B-shaped checkpoint written here with the real
config and vocabulary (248,320 rows), random bf16 weights, the hub layout (bench/full_size.py
writes it; the twin's tokenizer padded to the real vocabulary). `--layers N` keeps the real widths
and vocabulary at N of the 32 layers (every 4th full attention, the last one too): the size that
fits a short GPU window (bench/gpu_check/run.sh). `--size tiny`: the tiny Qwen3.5
twin, which is how the test suite runs this script on a CPU (a check of the script, not a
measurement). Batches as recipes/support.yaml trains them (its data, system prompt, max_length,
LoRA rank, batch size and accumulation), the same optimizer steps for every contender.

Each contender runs in its own process: real (non-pad) tokens per second over the training loop
after `--warmup-steps` untimed steps (default 3: the first steps compile and autotune kernels),
peak GPU memory (torch's allocator high-water mark; peak RSS on a CPU), and afterwards one
evaluator measures every adapter's held-out loss on the same tokens (ft's masks), all adapters on
one loaded base. A contender
that cannot run here (unsloth without CUDA) is listed with the reason, never left out silently.
Goal: ft ≥ 1.0× the unsloth backend's tokens/s at equal held-out loss, both ≥ 2× the TRL script.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import yaml

from bench.common import ROOT, machine, measured, python, table, write_result
from bench.train_throughput import heldout_losses
from finetune.run import RunDir

SUPPORT = ROOT / "recipes" / "support.yaml"


def checkpoint(size: str, work: Path, layers: int | None = None) -> Path:
    if size == "tiny":
        from finetune.twins import ensure_twin

        return ensure_twin("tiny-qwen3.5")
    from bench.full_size import QWEN35_9B, write_checkpoint

    folder = work / "qwen3.5-9b"
    # text only: training never reads the vision tower or the MTP head, and on a GPU machine's
    # short window every second spent writing and loading them is a second not measuring
    write_checkpoint(folder, "tiny-qwen3.5-hub", QWEN35_9B, layers, text_only=True)
    return folder


def bench_recipe(work: Path, base: Path, steps: int, batch: int, max_length: int) -> tuple[Path, dict]:
    """recipes/support.yaml pointed at the benchmark's base, for a fixed number of steps."""
    recipe = yaml.safe_load(SUPPORT.read_text())
    recipe["name"] = "bench-gpu-train"
    recipe["model"]["base"] = str(base)
    for split in ("train", "heldout"):
        recipe["data"][split] = str((SUPPORT.parent / recipe["data"][split]).resolve())
    recipe["data"].update(max_length=max_length, too_long="truncate")  # the TRL script truncates too
    # rehearsal off: the TRL script trains the job's rows only
    recipe["train"].update(max_steps=steps, batch_size=batch, save_steps=1_000_000, logging_steps=1, rehearsal=0)
    recipe["eval"] = {"after_train": False}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe


def trl_data(work: Path, recipe: dict) -> Path:
    """The same training conversations in TRL's conversational prompt-completion shape."""
    path = work / "trl_train.jsonl"
    with path.open("w") as out:
        for line in Path(recipe["data"]["train"]).read_text().splitlines():
            turns = json.loads(line)["messages"]
            prompt = [{"role": "system", "content": recipe["data"]["system_prompt"]}]
            prompt += [m for m in turns[:-1] if m["role"] != "system"]
            out.write(json.dumps({"prompt": prompt, "completion": [turns[-1]]}) + "\n")
    return path


def run_ft(recipe_path: Path, out: Path, backend: str, warmup: int) -> dict:
    m = measured(python("-m", "finetune", "train", str(recipe_path), "--output", str(out),
                        "--set", f"train.backend={backend}"), check=False)
    if m["returncode"] != 0:
        reason = [line for line in m["output"].splitlines() if line.startswith("error:")]
        if backend == "unsloth" and m["returncode"] == 2 and "cannot run here" in "".join(reason):
            return {"skipped": reason[0].removeprefix("error: ").removeprefix("train.backend: ")}
        raise SystemExit(f"ft train ({backend}) failed ({m['returncode']}):\n{m['output'][-4000:]}")
    run = RunDir(out)
    manifest = run.read_manifest()
    clock = [(r["step"], r["elapsed_s"], r["num_tokens"]) for r in run.read_metrics() if "elapsed_s" in r]
    seconds, tokens = timed_window(clock, warmup)
    return dict(runtime=seconds, tokens=tokens, adapter=run.adapter,
                vram=manifest.summary.peak_gpu_memory_gib, rss=m["peak_rss_mib"], loaded=manifest.loaded,
                kernels=manifest.packing.linear_attention if manifest.packing else None)


def timed_window(clock: list[tuple[int, float, float]], warmup: int) -> tuple[float, int]:
    """(seconds, real tokens) from the log at step `warmup` to the last one: the first steps
    compile and autotune kernels (fla's Triton kernels autotune every new shape) and would
    measure that, not training. ft's held-out loss at step 0 falls before step 1, outside too.
    Every contender logs every step (logging_steps 1) with the same clock (bench/trl_baseline.py's
    StepClock, ft's metrics.jsonl `elapsed_s`)."""
    if not clock:
        raise SystemExit("the contender logged no step times")
    start = [row for row in clock if row[0] <= warmup]
    first = start[-1] if start and start[-1] != clock[-1] else (0, 0.0, 0.0)
    last = clock[-1]
    return last[1] - first[1], int(last[2] - first[2])


def run_trl(data: Path, base: Path, out: Path, recipe: dict, targets: list[str], warmup: int) -> dict:
    t, lora = recipe["train"], recipe["lora"]
    m = measured(python("-m", "bench.trl_baseline", str(data), str(base), str(out), "--steps", str(t["max_steps"]),
                        "--batch-size", str(t["batch_size"]), "--grad-accum", str(t.get("grad_accum", 1)),
                        "--lr", str(t["lr"]), "--max-length", str(recipe["data"]["max_length"]),
                        "--r", str(lora["r"]), "--alpha", str(lora["alpha"]), "--dropout", str(lora["dropout"]),
                        "--targets", ",".join(targets), "--logging-steps", "1"))
    line = json.loads(m["output"].strip().splitlines()[-1])
    seconds, tokens = timed_window([tuple(row) for row in line["clock"]], warmup)
    return dict(runtime=seconds, tokens=tokens, adapter=out,
                vram=line["peak_gpu_memory_gib"], rss=m["peak_rss_mib"])


def write_atomically(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--layers", type=int, help="full size: this many of the 32 layers (real widths and vocabulary)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps at the start of every contender")
    ap.add_argument("--out", help="where to write the result JSON (default bench/results/gpu_train_<size>.json)")
    args = ap.parse_args()

    from finetune.bases import resolve_base
    from finetune.recipe import load_recipe
    from finetune.loading import lora_targets

    work = Path(tempfile.mkdtemp(prefix="ft-bench-gpu-"))
    base = checkpoint(args.size, work, args.layers)
    recipe_path, recipe = bench_recipe(work, base, args.steps, args.batch_size, args.max_length)
    targets = lora_targets(load_recipe(recipe_path), resolve_base(str(base)).family)
    print(f"machine: {machine()}\nmodel: {base} ({args.size}{f', {args.layers} layers' if args.layers else ''}); {args.steps} steps × {args.batch_size} × "
          f"{recipe['train'].get('grad_accum', 1)} accumulation, max_length {args.max_length}\n")

    w = args.warmup_steps
    contenders = {"ft (hf backend)": lambda: run_ft(recipe_path, work / "ft-hf", "hf", w),
                  "ft (unsloth backend)": lambda: run_ft(recipe_path, work / "ft-unsloth", "unsloth", w),
                  "TRL docs QLoRA script": lambda: run_trl(trl_data(work, recipe), base, work / "trl", recipe, targets, w)}
    results = {}
    for name, contender in contenders.items():
        results[name] = contender()
        if args.out:  # each contender's figures as soon as it finishes: an overrun later keeps them
            partial = {k: {f: v[f] for f in ("runtime", "tokens", "vram", "rss", "skipped") if f in v}
                       for k, v in results.items()}
            write_atomically(Path(args.out).with_suffix(".partial.json"), {"contenders": partial})
    ran = {k: v for k, v in results.items() if "skipped" not in v}
    losses = heldout_losses(recipe_path, {k: v["adapter"] for k, v in ran.items()})
    ft_tps = ran["ft (hf backend)"]["tokens"] / ran["ft (hf backend)"]["runtime"]
    rows, notes, record = [], [], {"machine": machine(), "size": args.size, "layers": args.layers, "steps": args.steps,
                                   "batch_size": args.batch_size, "max_length": args.max_length, "contenders": {}}
    for name, r in results.items():
        if "skipped" in r:
            notes.append(f"({len(notes) + 1}) {name} not run: {r['skipped']}")
            rows.append([name, "-", "-", "-", "-", "-", f"not run ({len(notes)})"])
            record["contenders"][name] = {"skipped": r["skipped"]}
            continue
        tps = r["tokens"] / r["runtime"]
        memory = f"{r['vram']:.2f} GiB GPU" if r["vram"] is not None else f"{r['rss']:,.0f} MiB RSS"
        rows.append([name, r["tokens"], r["runtime"], tps, memory, losses[name], f"{ft_tps / tps:.2f}×"])
        record["contenders"][name] = dict(real_tokens=r["tokens"], train_runtime_s=round(r["runtime"], 3),
                                          real_tokens_per_s=round(tps, 1), peak_gpu_memory_gib=r["vram"],
                                          peak_rss_mib=round(r["rss"]), heldout_loss=round(losses[name], 4),
                                          ft_hf_speedup=round(ft_tps / tps, 3),
                                          **{k: r[k] for k in ("loaded", "kernels") if r.get(k)})
        assert math.isfinite(losses[name]), (name, losses[name])
    print(table(["contender", "real tokens", "train s", "real tok/s", "peak memory", "held-out loss",
                 "ft (hf) speed ×"], rows))
    print(f"steps {min(args.warmup_steps, args.steps - 1) + 1}-{args.steps} timed" if args.steps > args.warmup_steps
          else f"all {args.steps} steps timed (no more than the {args.warmup_steps} warm-up steps were run)")
    for note in notes:
        print(note)
    if args.out:
        write_atomically(Path(args.out), record)
        print(f"\nwritten: {args.out}")
    else:
        print(f"\nwritten: {write_result(f'gpu_train_{args.size}', record)}")


if __name__ == "__main__":
    main()
