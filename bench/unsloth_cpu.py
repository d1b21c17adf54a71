"""bench/cpu_peers.py's Unsloth contender: its CPU backend as Unsloth's docs write a LoRA SFT.

Runs in Unsloth's own venv (bench/cpu_peers.py sets it up), so it imports nothing of ft's.
`UNSLOTH_FORCE_CPU=1` selects the CPU backend (unsloth_zoo/cpu: bf16 autocast where the CPU has
native bf16, bitsandbytes 4-bit base, chunked cross-entropy, fused AdamW, no packing).

    UNSLOTH_FORCE_CPU=1 python bench/unsloth_cpu.py DATA.jsonl MODEL_DIR OUT --steps 30 --targets q_proj,...

DATA: TRL's conversational prompt-completion rows (so the loss is on the answers only, as ft's).
Prints one JSON line: train_runtime_s, tokens, steps, and the precision it chose.
"""

from __future__ import annotations

import argparse
import json

from unsloth import FastLanguageModel  # first, as Unsloth's docs say: it patches transformers and TRL

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--targets", required=True)
    args = ap.parse_args()

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=args.max_length,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=args.r, lora_alpha=args.alpha, lora_dropout=0, bias="none",
                                             target_modules=args.targets.split(","),
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(output_dir=args.out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup_ratio,
                       max_length=args.max_length, optim="adamw_8bit", seed=3407, logging_steps=1,
                       save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config)
    result = trainer.train()
    model.save_pretrained(args.out)
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    print(json.dumps({"train_runtime_s": result.metrics["train_runtime"], "tokens": tokens,
                      "steps": trainer.state.global_step, "bf16": bool(trainer.args.bf16),
                      "optim": str(trainer.args.optim), "packing": bool(trainer.args.packing),
                      "dtype": str(model.dtype), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
