"""TRL's SFTTrainer as ft runs it: its arguments, the checks that it can train here with the
recipe's optimizer and trackers (the LM head it scores with on a CPU: finetune/lm_head.py)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from finetune.distributed import BatchPlan, fsdp_environment, trainer_arguments
from finetune.errors import UserError
from finetune.loading import Prepared, cpu_bf16, on_gpu
from finetune.models import Family
from finetune.recipe import Recipe
from finetune.run import RunDir

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to → package


def check_trackers(recipe: Recipe) -> None:
    """Every train.report_to tracker must be importable."""
    import importlib.util

    missing = [t for t in recipe.train.report_to if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed", "train.report_to",
                        f"pip install {' '.join(TRACKERS[t] for t in missing)}, or remove it from train.report_to")


def log_trackers_into(recipe: Recipe, run: RunDir) -> None:
    """tensorboard writes into the run folder."""
    import os

    if "tensorboard" in recipe.train.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.root / "tensorboard")  # transformers reads it here


def sft_config(recipe: Recipe, run: RunDir, plan: BatchPlan, family: Family, evaluate_first: bool = True):
    """TRL's arguments. Built before the model loads: under FSDP or ZeRO-3 they tell transformers
    how to load it (FSDP's low-RAM loading reads environment variables, ZeRO-3 a global they
    register), as peft's sharded-QLoRA scripts parse them first.

    `evaluate_first`: the held-out loss before training is computed inside `train()`
    (`eval_on_start`), after the model is prepared for its strategy. Evaluated before `train()`,
    FSDP wraps the model before peft gives the LoRA layers their own units (torch: "Must flatten
    tensors with uniform requires_grad"), and DeepSpeed builds an inference engine that refuses
    ZeRO-2 ("ZeRO inference only makes sense with ZeRO Stage 3")."""
    import os

    from trl import SFTConfig

    t, gpu = recipe.train, on_gpu()
    extra = trainer_arguments(recipe, family.decoder_layer) if plan.world_size > 1 else {}
    if recipe.distributed.strategy == "fsdp" and plan.world_size > 1:
        os.environ.update(fsdp_environment(family.decoder_layer))
    return SFTConfig(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        optim=t.optimizer,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a nan must show as nan (and finetune.train.guard stops at it)
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=evaluate_first,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=gpu or cpu_bf16(recipe),  # on a CPU: autocast, fp32 weights and optimizer
        use_cpu=not gpu,
        gradient_checkpointing=False,  # already set up by load_model (peft needs it first)
        max_length=recipe.data.max_length,
        packing=False,
        assistant_only_loss=False,  # labels come masked from finetune.data
        completion_only_loss=False,
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,  # ft draws its own progress bar
        dataloader_num_workers=0,
        **extra,  # what the distributed strategy needs (finetune/distributed.py)
    )


def check_optimizer(recipe: Recipe) -> None:
    """train.optimizer is any transformers `optim` name; an unknown one, or one whose package is
    not installed (galore, lomo, schedule-free), would fail only once the trainer is built."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    name = recipe.train.optimizer
    known = [o.value for o in OptimizerNames]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise UserError(f"unknown optimizer '{name}'", "train.optimizer",
                        (f"did you mean '{close[0]}'? " if close else "") + f"transformers knows: {', '.join(known)}")
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, optim=name, use_cpu=not on_gpu(), report_to="none")
        try:
            Trainer.get_optimizer_cls_and_kwargs(args)
        except (ImportError, ValueError) as exc:
            raise UserError(f"optimizer '{name}' cannot be used here: {exc}", "train.optimizer",
                            "install what it needs, or use adamw_torch") from None


def check_trl_can_train_here(gpu: bool) -> None:
    """TRL 1.15's SFTTrainer always scores through its Triton LM-head kernel (trl/kernels, which
    imports triton); CPU torch has no Triton and the kernel no CPU path, so every step dies with
    "'NoneType' object has no attribute 'apply'". TRL 1.16 added the non-Triton path. Said before
    anything loads (the unsloth extra pins TRL 1.15, which is fine on a GPU)."""
    import trl
    from trl.trainer import utils as trl_utils

    if hasattr(trl_utils, "_use_triton") or (gpu and getattr(trl_utils, "_ChunkedLogProbFunction", None)):
        return
    where = "a CPU" if not gpu else "a machine without Triton"
    raise UserError(f"TRL {trl.__version__} cannot train on {where}: its SFT trainer needs Triton kernels "
                    "(a CUDA GPU)", "installed packages", "pip install 'trl>=1.16' (it has a non-Triton path)")


def make_trainer(model, args, prep: Prepared, train_ds, heldout_ds, callbacks, packed: bool,
                 shared_prefix: bool = False):
    from transformers.trainer_callback import PrinterCallback

    from finetune.train.guard import SafeTrainer
    from finetune.lm_head import score_only_trained_positions
    from finetune.train.packing import PackingCollator

    # packed: rows share examples (train() installed the boundary-aware layers); else TRL pads
    collator = PackingCollator(prep.tokenizer.pad_token_id) if packed else None
    score_only_trained_positions()  # and CPU rows through ft's head (finetune/lm_head.py)
    trainer = SafeTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=heldout_ds,
                          processing_class=prep.tokenizer, callbacks=callbacks, data_collator=collator,
                          padded_rows=not packed, shared_prefix=shared_prefix)
    trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl and the progress bar
    if not on_gpu():
        keep_adapters_fp32(trainer.model)
        if args.bf16:
            lora_inputs_as_they_come(trainer.model)
    return trainer


def lora_inputs_as_they_come(model) -> int:
    """Under CPU bf16 autocast, leave each LoRA layer's input in the dtype it comes in; returns
    how many layers. peft's 4-bit LoRA wrapper casts its input to the adapter's dtype wherever
    autocast is off, and asks CUDA's (`torch.is_autocast_enabled()` with no device), so on a CPU
    a bf16 input (the MLP's down projection's) went to fp32 for the fp32 adapter and autocast
    took it back to bf16 for lora_A's matmul: the same numbers, with two copies and their
    backwards a layer (tests/test_dequantized.py: bit for bit)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            count += 1
    return count


def keep_adapters_fp32(model) -> int:
    """Cast the trainable weights back to fp32 on a CPU; returns how many were not.

    TRL 1.16's SFTTrainer casts a quantized model's trainable weights to bf16 (the QLoRA paper's
    choice, made for GPUs) on any device and whatever `bf16` says. On a CPU that made every LoRA
    matmul a bf16 one, emulated where the CPU has no native bf16 (a third of a step at the 0.8B's
    shape on an AVX2 EPYC, bench/RESULTS.md 18), and AdamW update bf16 weights everywhere. On a CPU
    ft trains adapters in fp32, as its 16-bit-base runs always did; bf16 autocast
    (train.cpu_bf16) still multiplies them in bf16 where the CPU has it natively."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def restore_finished(trainer, checkpoint: Path):
    """A run killed after its last checkpoint (during the final eval or adapter save) only needs
    that checkpoint's adapter: transformers 5.23, resumed from the final checkpoint, would train
    one step past max_steps. Returns None when the checkpoint is not the last one."""
    from types import SimpleNamespace

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if not 0 < state["max_steps"] <= state["global_step"]:
        return None
    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.state.global_step = state["global_step"]
    losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    return SimpleNamespace(training_loss=losses[-1] if losses else None, metrics={})
