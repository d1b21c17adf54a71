"""The baseline of bench/real_model_train.py: LoRA fine-tuning as a CPU user writes it by hand with
transformers + peft, no trainer: the model in fp32, LoRA on every linear layer, the chat template
for the prompt, labels only on the answer and its end-of-turn token, padded batches, AdamW with
the same warmup and cosine schedule as ft's recipe.

    python -m bench.plain_lora_loop BASE TRAIN.jsonl SYSTEM OUT --steps N --batch-size B --lr LR

Prints one JSON line: train_runtime_s and real (non-pad) tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("base", "train", "system", "out"):
        ap.add_argument(name)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--seed", type=int, default=0, help="LoRA initialisation and example order")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=args.targets.split(",")))
    examples = []
    for line in open(args.train, encoding="utf-8"):
        messages = [{"role": "system", "content": args.system}] + json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]  # ends with <|im_end|>
        examples.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]))
    random.Random(args.seed).shuffle(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_ratio * args.steps), args.steps)
    pad = tokenizer.pad_token_id
    model.train()
    tokens, started = 0, time.monotonic()
    for step in range(args.steps):
        batch = examples[step * args.batch_size:(step + 1) * args.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    runtime = time.monotonic() - started
    model.save_pretrained(args.out)
    print(json.dumps({"train_runtime_s": runtime, "tokens": tokens}))


if __name__ == "__main__":
    main()
