"""Training throughput: ft against a plain TRL SFTTrainer script, same twin, data and steps.

    python -m bench.train_throughput [--steps 40] [--data bitext|support]

Data with real length variety: Bitext customer-support conversations from ../shared/data when
present (80 to 900 tokens with the twin's tokenizer), else the shipped support set. Each
contender runs in its own process on the same examples in the same order (the Trainer's seeded
sampler over the same file), for the same optimizer steps; real (non-pad) tokens per second,
peak RSS, and afterwards held-out loss of every adapter measured by one evaluator.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
from pathlib import Path

import yaml

from finetune.run import RunDir
from bench.common import ROOT, SHARED, machine, measured, python, table, write_result

SYSTEM = "You are a customer support assistant. Answer the customer's request."
BITEXT = SHARED / "data" / "bitext_llm" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"


def conversations(source: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    if source == "bitext":
        rows = [(r["instruction"], r["response"]) for r in csv.DictReader(BITEXT.open(encoding="utf-8"))]
        rows = [r for r in rows if len(r[0]) + len(r[1]) < 2500]  # fits max_length with the twin's tokenizer
    else:
        lines = (ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines()
        rows = []
        for line in lines:
            msgs = json.loads(line)["messages"]
            rows.append((next(m["content"] for m in msgs if m["role"] == "user"),
                         next(m["content"] for m in msgs if m["role"] == "assistant")))
    random.Random(seed).shuffle(rows)
    if len(rows) < count:
        raise SystemExit(f"{source} has {len(rows)} usable conversations, {count} needed")
    return rows[:count]


def write_data(folder: Path, train: list, heldout: list) -> None:
    def chat(u, a):
        return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}

    for name, rows in (("train", train), ("heldout", heldout)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(chat(u, a)) + "\n" for u, a in rows))
    # the baseline's shape: TRL's conversational prompt-completion, same system prompt
    (folder / "trl_train.jsonl").write_text("".join(json.dumps({
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}],
        "completion": [{"role": "assistant", "content": a}]}) + "\n" for u, a in train))


def recipe(folder: Path, steps: int, batch: int, max_length: int) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bench-train",
        "model": {"base": "tiny-qwen3.5"},
        "data": {"train": "train.jsonl", "heldout": "heldout.jsonl", "system_prompt": SYSTEM,
                 "max_length": max_length},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": steps, "lr": 2e-3, "batch_size": batch, "warmup_ratio": 0.05,
                  "gradient_checkpointing": False, "packing": True, "save_steps": 100_000, "logging_steps": 5,
                  "rehearsal": 0},  # the same rows as the contenders
        "eval": {"after_train": False},
    }))
    return path


def heldout_losses(recipe_path: Path, adapters: dict[str, Path]) -> dict[str, float]:
    """Mean loss per trained held-out token, one evaluator for every adapter (ft's masks), all of
    them on one loaded base (peft switches adapters; on a GPU a 9B base loads once, not per contender)."""
    from peft import PeftModel

    from finetune import render
    from finetune import loading
    from finetune.recipe import load_recipe

    r = load_recipe(recipe_path)
    prep = loading.prepare(r)
    ds, _ = render.tokenize_all(prep.renderer, prep.splits.heldout, r.data.max_length, "truncate")
    rows = list(zip(ds["input_ids"], ds["labels"]))
    out, model = {}, None
    for k, (name, adapter) in enumerate(adapters.items()):
        label = f"contender{k}"  # peft adapter names become module keys: no spaces or dots
        if model is None:
            model = PeftModel.from_pretrained(loading.load_base_model(r, prep.base), str(adapter), adapter_name=label)
        else:
            model.load_adapter(str(adapter), adapter_name=label)
        model.set_adapter(label)
        model.eval()
        out[name] = mean_token_loss(model, rows, prep.tokenizer.pad_token_id)
    return out


def mean_token_loss(model, rows: list[tuple[list[int], list[int]]], pad: int, batch: int = 8) -> float:
    """Teacher-forced loss over the labelled tokens of (input_ids, labels) rows. The batches go to
    the model's device: loaded with device_map={"": 0} a model gets no hooks that move its inputs."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk], device=model.device)
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk], device=model.device)
            mask = (torch.arange(width, device=model.device)[None]
                    < torch.tensor([len(x) for x, _ in chunk], device=model.device)[:, None])
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--data", choices=["bitext", "support"], default="bitext" if BITEXT.exists() else "support")
    args = ap.parse_args()

    from finetune.loading import lora_targets
    from finetune.bases import resolve_base
    from finetune.recipe import load_recipe
    from finetune.twins import ensure_twin

    twin = ensure_twin("tiny-qwen3.5")
    work = Path(tempfile.mkdtemp(prefix="ft-bench-train-"))
    rows = conversations(args.data, args.steps * args.batch_size + 100)
    write_data(work, rows[100:], rows[:100])
    recipe_path = recipe(work, args.steps, args.batch_size, args.max_length)
    targets = ",".join(lora_targets(load_recipe(recipe_path), resolve_base("tiny-qwen3.5").family))
    print(f"machine: {machine()}\ndata: {args.data}, {args.steps} steps x {args.batch_size} examples\n")

    results = {}
    # ft with packing off isolates what packing itself brings on this data
    for name, extra in (("ft (packing)", []), ("ft, packing off", ["--set", "train.packing=false"])):
        ft_run = work / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        m = measured(python("-m", "finetune", "train", str(recipe_path), "--output", str(ft_run), *extra))
        summary, tokens = RunDir(ft_run).read_manifest().summary, RunDir(ft_run).trained_tokens()
        results[name] = dict(runtime=summary.train_runtime_s, tokens=int(tokens), rss=m["peak_rss_mib"],
                             adapter=ft_run / "adapter")
    for name, extra in (("TRL, docs defaults", []), ("TRL, ft's CPU settings", ["--tuned"])):
        out = work / name.split(",")[1].strip().replace(" ", "-").replace("'", "")
        m = measured(python("-m", "bench.trl_baseline", str(work / "trl_train.jsonl"), str(twin), str(out),
                            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                            "--max-length", str(args.max_length), "--targets", targets, *extra))
        line = json.loads(m["output"].strip().splitlines()[-1])
        results[name] = dict(runtime=line["train_runtime_s"], tokens=int(line["tokens"]), rss=m["peak_rss_mib"],
                             adapter=out)

    losses = heldout_losses(recipe_path, {k: v["adapter"] for k, v in results.items()})
    ft_tps = results["ft (packing)"]["tokens"] / results["ft (packing)"]["runtime"]
    rows_out, record = [], {"machine": machine(), "data": args.data, "steps": args.steps,
                            "batch_size": args.batch_size, "contenders": {}}
    for name, r in results.items():
        tps = r["tokens"] / r["runtime"]
        rows_out.append([name, r["tokens"], r["runtime"], tps, r["rss"], losses[name], ft_tps / tps])
        record["contenders"][name] = dict(real_tokens=r["tokens"], train_runtime_s=round(r["runtime"], 2),
                                          real_tokens_per_s=round(tps, 1), peak_rss_mib=round(r["rss"]),
                                          heldout_loss=round(losses[name], 4), ft_speedup=round(ft_tps / tps, 3))
    print(table(["contender", "real tokens", "train s", "real tok/s", "peak RSS MiB", "held-out loss",
                 "ft speed-up"], rows_out))
    print(f"\nwritten: {write_result('train_throughput', record)}")


if __name__ == "__main__":
    main()
