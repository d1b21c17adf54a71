"""Held-out generation: ft's batched, left-padded generation against one prompt at a time.

    python -m bench.eval_throughput [--run runs/tiny-support] [--items 48] [--batch-size 16]

Same model, same prompts, same greedy budget, in one process. Without --run it uses the
tiny Qwen3.5 twin untrained, which never stops early (every prompt runs the whole budget);
with a trained run, answers stop at different lengths, as in `ft eval`. Also reports how many
answers are identical between the two ways (greedy decoding should not depend on batching).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import ROOT, machine, table, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished run folder (its adapter is loaded)")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    from eval.columns import TransformersColumn
    from eval.heldout import build_items
    from finetune import loading
    from finetune.recipe import load_recipe

    recipe_path = args.run / "recipe.yaml" if args.run else ROOT / "recipes" / "tiny-support.yaml"
    recipe = load_recipe(recipe_path)
    prep = loading.prepare(recipe)
    model = loading.load_base_model(recipe, prep.base)
    if args.run:
        model = PeftModel.from_pretrained(model, str(args.run / "adapter"))
    model.eval()
    items = build_items(prep.splits.heldout[:args.items], prep.renderer)
    eot = prep.tokenizer.convert_tokens_to_ids(list(prep.base.family.end_of_turn))
    torch.manual_seed(0)

    timings, answers = {}, {}
    for name, size in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        column = TransformersColumn(name, model, prep.tokenizer, eot, size, args.max_new_tokens)
        start = time.perf_counter()
        answers[name] = column.generate(items)
        timings[name] = time.perf_counter() - start
    one, batched = answers.values()
    same = sum(a.text == b.text for a, b in zip(one, batched))
    tokens = sum(len(prep.tokenizer(a.text)["input_ids"]) + a.stopped for a in one)
    base_s = timings["one at a time"]
    rows = [[name, len(items), s, len(items) / s, base_s / s] for name, s in timings.items()]
    print(f"machine: {machine()}\nmodel: {'run ' + str(args.run) if args.run else 'tiny-qwen3.5 twin (untrained)'}, "
          f"{len(items)} held-out prompts, {args.max_new_tokens} new tokens max, ~{tokens} answer tokens\n")
    print(table(["generation", "prompts", "seconds", "prompts/s", "speed-up"], rows))
    print(f"\nidentical answers: {same}/{len(items)}")
    ratio = base_s / timings[f"batched ({args.batch_size})"]
    path = write_result("eval_throughput", {
        "machine": machine(), "model": str(args.run or "tiny-qwen3.5 twin"), "prompts": len(items),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "seconds": {k: round(v, 2) for k, v in timings.items()}, "speedup": round(ratio, 2),
        "identical_answers": same})
    print(f"written: {path}")


if __name__ == "__main__":
    main()
