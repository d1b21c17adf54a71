"""The baseline: a plain TRL QLoRA script, written the way TRL's documentation shows it.

4-bit base through BitsAndBytesConfig, a LoraConfig handed to SFTTrainer, a conversational
prompt-completion dataset, padding to the longest example in the batch, no packing, TRL's
defaults for everything the comparison does not need to pin. `--tuned` gives it ft's CPU
settings (no gradient checkpointing, fp32 compute) so that what is left is packing alone.

    python -m bench.trl_baseline DATA.jsonl MODEL_DIR OUT_DIR --steps 40 [--tuned]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepClock(TrainerCallback):
    """(step, seconds since train() began, tokens so far) at every log, as ft's metrics.jsonl has
    them: a benchmark times from step k on, past the warm-up steps (first kernels, autotuning)."""

    def __init__(self):
        self.started, self.rows = time.monotonic(), []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.rows.append([state.global_step, round(time.monotonic() - self.started, 3), logs["num_tokens"]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", required=True, help="comma-separated LoRA target modules (ft's, for equal work)")
    ap.add_argument("--tuned", action="store_true")
    ap.add_argument("--logging-steps", type=int, default=5)
    args = ap.parse_args()

    dataset = load_dataset("json", data_files=args.data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # the docs' bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are slow and TRL would refuse bf16
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
    )
    extra = dict(gradient_checkpointing=False, bf16=False) if args.tuned else {}
    if not torch.cuda.is_available():
        extra["use_cpu"] = True  # without it TRL's bf16 default refuses to start on a CPU
    config = SFTConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=args.max_length,
        seed=42, logging_steps=args.logging_steps, save_strategy="no", report_to="none", disable_tqdm=True, **extra,
    )
    peft_config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets.split(","),
                             task_type="CAUSAL_LM")
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    result = trainer.train()
    trainer.save_model(args.out)
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    vram = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    print(json.dumps({"train_runtime_s": result.metrics["train_runtime"], "tokens": tokens,
                      "steps": trainer.state.global_step, "peak_gpu_memory_gib": vram,
                      "bf16": bool(trainer.args.bf16), "clock": clock.rows, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}))


if __name__ == "__main__":
    main()
