"""`ft train`: plan, open the run, fit, finish.

The hf backend is transformers + bitsandbytes + peft + TRL, on CPU or GPU. The unsloth backend
(CUDA only, `pip install '.[unsloth]'`) swaps in unsloth's loader and LoRA wrapper and keeps
everything else (data, masks, trainer, run folder) identical. This room:

    plan.py      every check before weights load (shared with `ft validate`)
    backends.py  which stack loads the model, and what it really loaded
    lora.py      peft's preparation and the LoRA adapters
    trainer.py   TRL's arguments and trainer
    guard.py     whole checkpoints, signals, non-finite losses
    packing.py   padding-free rows with example boundaries kept
    progress.py  metrics.jsonl, the progress bar, the loss plot

`__init__.py` stays empty: unsloth must be imported before transformers (plan.py does it first).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from finetune import logs
from finetune.adapter import AdapterInfo, save_adapter
from finetune.bases import ResolvedBase
from finetune.distributed import barrier, check_resume, shards, start, world
from finetune.errors import Interrupted, UserError
from finetune.loading import lora_targets, on_gpu
from finetune.recipe import Recipe
from finetune.run import (BaseRecord, DistributedRecord, PackingRecord, ProcessRecord, RehearsalRecord, RunDir,
                          TrainSummary, atomic_write_text, checkpoint_step, data_hashes, failure_recorded, git_commit, hardware,
                          last_complete_checkpoint, now, package_versions, recipe_sha256, start_run)
from finetune.train.plan import StageCheck, TrainingPlan, plan_training

# train.rehearsal's rows for the model about to train: (rows, whether the base's answers were
# cached). Made by eval (its generation and general prompts); the CLI hands it in.
RehearsalSource = Callable[..., tuple[list, bool]]


def base_record(base: ResolvedBase) -> BaseRecord:
    """What the manifest says of the base: where, which family, and what the weights are."""
    from finetune.packaged import source_of

    return BaseRecord(name=base.name, path=base.path, family=base.family.name, weights=base.weights,
                      source=source_of(Path(base.path)) if Path(base.path).is_dir() else None)


def say(console, line: str) -> None:
    if console is not None:
        console.print(line, markup=False, highlight=False)


def train(recipe: Recipe, run: RunDir, resume: bool = False, overwrite: bool = False, console=None,
          checks: Sequence[StageCheck] = (), rehearsal: RehearsalSource | None = None) -> TrainSummary:
    """Train the recipe into `run`. In a multi-process launch every rank calls this; rank 0 alone
    writes the run folder (the others pass console=None and write nothing but their share of
    each checkpoint's RNG state). Everything knowable without the weights is checked before the
    folder is made: `checks` are later stages' (the CLI hands in eval's metric and gate check),
    `rehearsal` makes train.rehearsal's rows once the model is loaded."""
    w = world()
    plan = plan_training(recipe, run.root, w.size, checks)  # imports unsloth first when it trains
    start(w)  # the process group: nothing above is collective
    for line in plan.stage_checks:
        say(console, f"  checked: {line}")
    for line in plan.estimate:
        say(console, f"  preflight: {line}")
    say(console, f"  {plan.data_line()}")
    checkpoint = open_run(recipe, run, plan, resume, overwrite, console)
    with failure_recorded(run, w.main):
        return fit_and_finish(recipe, run, plan, checkpoint, console, rehearsal)


def open_run(recipe: Recipe, run: RunDir, plan: TrainingPlan, resume: bool, overwrite: bool,
             console) -> Path | None:
    """Make (or reopen) the run folder and write its manifest; returns the checkpoint to resume."""
    w = world()
    if resume:
        note = check_resume(run.read_manifest() if run.root.is_dir() else None, recipe, w.size)
        if note:
            say(console, f"  {note}")
    checkpoint = None
    if w.main:
        checkpoint, restarted = start_run(recipe, run, resume, overwrite)  # only now is anything written
        logs.attach(run.root / "logs" / "train.log")
        if restarted:
            say(console, f"  starting {run.root} over: {restarted}")
    barrier()  # the others find the folder (and the checkpoint to resume) as rank 0 left it
    if not w.main:
        return last_complete_checkpoint(run) if resume else None
    old = run.read_manifest() if checkpoint else None
    atomic_write_text(run.recipe, recipe.to_yaml())
    b = plan.batches
    run.update_manifest(
        name=recipe.name, status="running", started=old.started if old and old.started else now(), ended=None,
        recipe_sha256=recipe_sha256(recipe), data_sha256=data_hashes(recipe), base=base_record(plan.base),
        data={**plan.splits.stats, "train_tokens": plan.train_tokens, "heldout_tokens": plan.heldout_tokens},
        backend=plan.backend, backend_fallback=plan.backend_fallback, seed=recipe.train.seed, versions=package_versions(),
        git_commit=git_commit(Path(__file__).parent), hardware=hardware(),
        resumed_from=str(checkpoint) if checkpoint else None, preflight=plan.estimate,
        linear_attention_kernels_missing=plan.slow_kernels,
        distributed=DistributedRecord(world_size=b.world_size, strategy=recipe.distributed.strategy,
                                      micro_batch=b.micro_batch, grad_accum=b.grad_accum, global_batch=b.global_batch),
        process=ProcessRecord(pid=os.getpid(), host=socket.gethostname()), error=None,
        summary=old.summary if old else TrainSummary(),
    )
    run.keep_metrics_through(checkpoint_step(checkpoint) if checkpoint else 0)
    return checkpoint


@dataclass
class Fitted:
    trainer: object
    loaded: dict
    training_loss: float | None
    runtime_s: float | None
    heldout_loss_start: float | None
    restored: bool = False  # finished from the last checkpoint: train() never ran


def fit_and_finish(recipe: Recipe, run: RunDir, plan: TrainingPlan, checkpoint: Path | None,
                   console, rehearsal: RehearsalSource | None = None) -> TrainSummary:
    fitted = fit(recipe, run, plan, checkpoint, console, rehearsal)
    return finish(recipe, run, plan, fitted, checkpoint)


def fit(recipe: Recipe, run: RunDir, plan: TrainingPlan, checkpoint: Path | None, console,
        rehearsal: RehearsalSource | None = None) -> Fitted:
    """Load the model, build the trainer and train (or restore a finished checkpoint). Divergence
    and signals end here, each recorded in the manifest."""
    from finetune.train.backends import check_loaded, loaded_facts
    from finetune.train.guard import NonFiniteLoss, NonFiniteWeights, StopOnNonFiniteLoss, StopOnSignal
    from finetune.train.lora import load_model
    from finetune.train import shared_prefix
    from finetune.train.packing import segment_aware_linear_attention
    from finetune.train.progress import HeldoutLossAtStart, MetricsCallback, RichProgress
    from finetune.train.trainer import log_trackers_into, make_trainer, restore_finished, sft_config

    w, prep = world(), plan.prep
    if w.main:
        log_trackers_into(recipe, run)
    args = sft_config(recipe, run, plan.batches, prep.base.family, evaluate_first=checkpoint is None)  # before the model
    model = load_model(recipe, prep, plan.backend, plan.preflight.gradient_checkpointing)
    loaded = loaded_facts(model)
    check_loaded(loaded, recipe, prep.base.path, plan.backend)
    packed = recipe.train.packing and plan.backend == "hf"  # unsloth brings its own padding-free path
    linear_attention = None
    if packed or (plan.backend == "hf" and not on_gpu()):  # on a CPU ft's delta rule, packed or not
        kernels = segment_aware_linear_attention()
        if packed:
            linear_attention = kernels.describe() if on_gpu() else "ft's PyTorch version (CPU)"
    if w.main:
        run.update_manifest(loaded=loaded, packing=PackingRecord(enabled=packed, linear_attention=linear_attention))
    train_dataset = with_rehearsal(recipe, run, plan, model, rehearsal, console)
    nonfinite, stop = StopOnNonFiniteLoss(), StopOnSignal()
    progress = RichProgress(console) if w.main else None
    start_loss = HeldoutLossAtStart(run if w.main else None)
    callbacks = [MetricsCallback(run), nonfinite, start_loss, stop] + ([progress] if progress else [])
    shares = recipe.train.shared_prefix and plan.backend == "hf" and shared_prefix.applies(
        model, packed, plan.preflight.gradient_checkpointing)
    trainer = make_trainer(model, args, prep, train_dataset, plan.heldout_dataset, callbacks, packed, shares)
    try:
        result = restore_finished(trainer, checkpoint) if checkpoint is not None else None
        restored = result is not None
        if result is None:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteWeights as exc:
        nonfinite.step, nonfinite.loss = exc.step, float("nan")
    except NonFiniteLoss as exc:
        nonfinite.step, nonfinite.loss = exc.step, exc.loss
    finally:
        stop.restore()
        if progress:
            progress.on_train_end(None, None, None)
    if nonfinite.step is not None:
        if w.main:
            run.update_manifest(status="diverged", ended=now())
        good = last_complete_checkpoint(run)
        raise UserError(
            f"training diverged: the loss became {nonfinite.loss} at step {nonfinite.step}", "train.lr",
            f"lower train.lr (now {recipe.train.lr:g}) and start again with --overwrite"
            + (f"; the last good checkpoint is kept at {good}" if good else ""))
    if stop.received is not None:
        if w.main:
            run.update_manifest(status="interrupted", ended=now())
        raise Interrupted(stop.received, trainer.state.global_step, last_complete_checkpoint(run))
    return Fitted(trainer, loaded, result.training_loss, result.metrics.get("train_runtime"), start_loss.loss,
                  restored=restored)


def with_rehearsal(recipe: Recipe, run: RunDir, plan: TrainingPlan, model, rehearsal: RehearsalSource | None,
                   console):
    """The training rows, with train.rehearsal's mixed in. Rank 0 makes them (the base's answers
    are generated once and cached); the others read them after it."""
    from finetune.render import mixed_with

    share = plan.rehearsal_share
    if not share or rehearsal is None:
        return plan.train_dataset
    w = world()
    if w.main:
        rows, cached = rehearsal(recipe, model, plan.prep, lambda line: say(console, f"  {line}"))
    barrier()
    if not w.main:
        rows, cached = rehearsal(recipe, model, plan.prep, lambda line: say(console, f"  {line}"))
    dataset, count = mixed_with(plan.train_dataset, rows, share)
    say(console, f"  rehearsal: {count} rows of the base's own answers to {len(rows)} general prompts "
                 f"({count / len(dataset):.0%} of {len(dataset)} rows)")
    if w.main:
        run.update_manifest(rehearsal=RehearsalRecord(share=share, prompts=len(rows), rows=count,
                                                      cached=cached))
    return dataset


def finish(recipe: Recipe, run: RunDir, plan: TrainingPlan, fitted: Fitted, checkpoint: Path | None) -> TrainSummary:
    """The held-out loss after training, the adapter folder, and the manifest marked complete."""
    w, trainer, prep = world(), fitted.trainer, plan.prep
    # a resumed run measured its starting loss when it first started (the manifest kept it)
    start_loss = fitted.heldout_loss_start if checkpoint is None else run.read_manifest().summary.heldout_loss_start
    # A sharded run finished from its last checkpoint never ran train(), so the model was never
    # prepared for its strategy: evaluating or gathering it now would prepare it outside train(),
    # where FSDP1 ("Must flatten tensors with uniform requires_grad") and ZeRO-2 (an inference
    # engine) fail. Every rank restored the whole adapter; rank 0 saves it as it is, and the
    # held-out loss after training is left to ft eval.
    unprepared = fitted.restored and shards(recipe)
    summary = TrainSummary(heldout_loss_start=start_loss,
                           heldout_loss_end=None if unprepared else trainer.evaluate()["eval_loss"],
                           train_loss=fitted.training_loss, steps=trainer.state.global_step,
                           train_runtime_s=fitted.runtime_s)
    if on_gpu():  # what the README's GPU sizes are measured by
        import torch

        summary.peak_gpu_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    gathered = None
    if shards(recipe) and not unprepared:
        # FSDP / DeepSpeed hold the adapter in shards: save_model gathers it (every rank takes part)
        gathered = run.root / ".adapter.gathered"
        trainer.save_model(str(gathered))
        barrier()
    if w.main:
        from finetune.train.progress import plot_loss

        save_trained_adapter(trainer.model, prep, recipe, run, plan.backend, fitted.loaded, gathered)
        plot_loss(run)
        run.update_manifest(status="complete", ended=now(), summary=summary)
    barrier()
    return summary


def save_trained_adapter(model, prep, recipe: Recipe, run: RunDir, backend: str, loaded: dict,
                         gathered: Path | None = None) -> None:
    """adapter/ with its ft_adapter.json (finetune/adapter.py), from the trained model."""
    family = prep.base.family
    info = AdapterInfo(
        base_model=prep.base.name, base_path=prep.base.path, base_weights=prep.base.weights, family=family.name,
        gguf_arch=family.gguf_arch, end_of_turn=list(family.end_of_turn), template_kwargs=prep.template_kwargs,
        lora_targets=lora_targets(recipe, family), quantization=recipe.quantization.model_dump(),
        backend=backend, license=prep.base.license, loaded=loaded)
    save_adapter(run, info, lambda folder: model.save_pretrained(str(folder), safe_serialization=True),
                 prep.tokenizer, recipe.to_yaml(), prep.template, gathered)
