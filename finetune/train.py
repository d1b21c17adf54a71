"""Training: TRL's SFTTrainer on the loaded model, and a self-describing run folder.

The hf backend is transformers + bitsandbytes + peft + TRL, on CPU or GPU. The unsloth backend
(CUDA only, `pip install '.[unsloth]'`) swaps in unsloth's loader and LoRA wrapper and keeps
everything else (data, masks, trainer, run folder) identical; finetune/backends.py holds what
each backend is handed and checks what it loaded. Building the model (4-bit, LoRA) is
finetune/loading.py's job; this file runs the training.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from finetune import data as data_mod
from finetune import logs, render
from finetune.backends import check_loaded, loaded_facts, pick_backend
from finetune.bases import ResolvedBase
from finetune.distributed import (BatchPlan, barrier, batch_plan, check_resume, check_strategy, shards, start,
                                  trainer_arguments, world)
from finetune.errors import Interrupted, UserError
from finetune.loading import Prepared, check_module_settings, load_model, lora_targets, on_gpu, prepare, skeleton
from finetune.models import Family
from finetune.packing import missing_kernels_note, segment_aware_linear_attention
from finetune.recipe import Recipe
from finetune.run import RunDir, atomic_write_text, git_commit, hardware, now, package_versions, write_json


def base_record(base: ResolvedBase) -> dict:
    """What the manifest says of the base: where, which family, and what the weights are."""
    from finetune.packaged import source_of

    record = {"name": base.name, "path": base.path, "family": base.family.name, "weights": base.weights}
    source = source_of(Path(base.path)) if Path(base.path).is_dir() else None
    if source:
        record["source"] = source
    return record


# --- trainer ----------------------------------------------------------------------------------

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to → package


def check_trackers(recipe: Recipe, run: RunDir) -> None:
    """Every train.report_to tracker must be importable; tensorboard writes into the run folder."""
    import importlib.util
    import os

    missing = [t for t in recipe.train.report_to if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed", "train.report_to",
                        f"pip install {' '.join(TRACKERS[t] for t in missing)}, or remove it from train.report_to")
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
        # transformers loads with FSDP's low-RAM path (rank 0 reads, the others get meta tensors)
        # only when accelerate's launcher said FSDP; `accelerate launch --multi_gpu` does not
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_VERSION"] = "1"
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
        logging_nan_inf_filter=False,  # a nan must show as nan (and finetune.guard stops at it)
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=evaluate_first,
        seed=t.seed,
        data_seed=t.seed,
        bf16=gpu,
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


def score_only_trained_positions() -> bool:
    """TRL (1.16) projects hidden states through the LM head in tiles and, on devices without
    Triton, for every position, labelled or not: its reason is Neuron, where a changing number of
    positions recompiles the graph. An eager CPU has nothing to recompile, and in a chat SFT most
    positions are prompt (two thirds of a support ticket), each costing a vocabulary-wide
    projection forward and backward: 31% of a SmolLM2 step on 2 cores (49,152 rows). TRL's own
    compact path (only positions whose label is not -100, scattered back as zeros) gives the same
    loss and gradients; this turns it on for the CPU. Returns whether TRL has the switch."""
    import torch
    from trl.trainer import utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None or getattr(decide, "ft_cpu_compact", False):
        return decide is not None

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or decide(device)

    compact_on_cpu.ft_cpu_compact = True
    trl_utils._use_triton = compact_on_cpu  # the name TRL's fused LM head reads; its kernels keep theirs
    return True


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


def make_trainer(model, args, prep: Prepared, train_ds, heldout_ds, callbacks, packed: bool):
    from transformers.trainer_callback import PrinterCallback

    from finetune.guard import SafeTrainer
    from finetune.packing import PackingCollator

    # packed: rows share examples (train() installed the boundary-aware layers); else TRL pads
    collator = PackingCollator(prep.tokenizer.pad_token_id) if packed else None
    score_only_trained_positions()
    trainer = SafeTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=heldout_ds,
                          processing_class=prep.tokenizer, callbacks=callbacks, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl and the progress bar
    return trainer


def last_complete_checkpoint(run: RunDir) -> Path | None:
    from finetune.guard import complete_checkpoints

    done = complete_checkpoints(run.checkpoints)
    return done[-1] if done else None


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


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def data_hashes(recipe: Recipe) -> dict[str, dict[str, str | None]]:
    """sha256 of every data file: {"train": {path: sha256}, "heldout": {path: sha256}}."""
    heldout = recipe.data.heldout
    return {"train": {s.path: data_mod.sha256_file(s.path) for s in recipe.data.sources},
            "heldout": {heldout: data_mod.sha256_file(heldout)} if heldout else {}}


def check_data_unchanged(manifest: dict | None, recipe: Recipe) -> None:
    """A resumed run must see the data it started with: the split, the order and the step count
    all depend on it, and the manifest would describe data the adapter was not trained on."""
    recorded = (manifest or {}).get("data_sha256") or {}
    now_hashes = data_hashes(recipe)
    for key in ("train", "heldout"):
        for path, digest in (recorded.get(key) or {}).items():
            if digest and now_hashes[key].get(path) != digest:
                raise UserError(f"the data file changed since this run started: {path}", f"data.{key}",
                                "restore the file as it was to resume, or start a new run (--overwrite or --output DIR)")


def left_by_a_failed_start(run: RunDir) -> str | None:
    """Why an existing run folder holds nothing worth keeping, or None. A start that stopped before
    any checkpoint was saved (a user error found once the model loaded, a crash, a killed process)
    left a manifest and logs but no trained weights: running the fixed recipe into it just works.
    A folder with a complete checkpoint or an adapter stays protected."""
    from finetune.guard import complete_checkpoints

    manifest = run.read_manifest()
    if not manifest or complete_checkpoints(run.checkpoints) or run.adapter.exists():
        return None
    status = manifest.get("status")
    if status in ("failed", "interrupted", "diverged"):
        return f"its start {status} before any checkpoint was saved"
    process = manifest.get("process") or {}
    if status == "running" and process.get("host") == socket.gethostname() and not process_alive(process.get("pid")):
        return f"the process that started it (pid {process.get('pid')}) is gone and no checkpoint was saved"
    return None


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def start_run(recipe: Recipe, run: RunDir, resume: bool, overwrite: bool) -> tuple[Path | None, str | None]:
    """Create (or reopen) the run folder. Returns the checkpoint to resume from, if any, and why an
    existing folder was started over (see left_by_a_failed_start)."""
    restarted = None
    if run.root.exists() and not resume:
        restarted = None if overwrite else left_by_a_failed_start(run)
        if not overwrite and not restarted and any(run.root.iterdir()):
            raise UserError(f"run folder already exists: {run.root}", "ft train",
                            "pass --resume to continue it, --overwrite to start over, or --output DIR")
        shutil.rmtree(run.root, ignore_errors=True)
    checkpoint = None
    if resume:
        old = run.read_manifest()
        if old and old.get("recipe_sha256") != recipe_sha256(recipe):
            raise UserError("the recipe changed since this run started", str(run.recipe),
                            "resume with the same recipe and overrides, or start a new run")
        check_data_unchanged(old, recipe)
        checkpoint = last_complete_checkpoint(run)
    run.root.mkdir(parents=True, exist_ok=True)
    return checkpoint, restarted


def save_adapter(model, prep: Prepared, recipe: Recipe, run: RunDir, backend: str, loaded: dict,
                 gathered: Path | None = None) -> None:
    """Write adapter/ under a temporary name and rename it into place when complete.
    `gathered`: a folder Trainer.save_model already wrote (a sharded adapter, gathered)."""
    tmp = run.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if gathered is not None:
        gathered.rename(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle ft never reads
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    prep.tokenizer.save_pretrained(str(tmp))
    (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (tmp / "chat_template.train.jinja").write_text(prep.template, encoding="utf-8")
    family = prep.base.family
    write_json(tmp / "ft_adapter.json", {
        "base_model": prep.base.name, "base_path": prep.base.path, "base_weights": prep.base.weights,
        "family": family.name,
        "gguf_arch": family.gguf_arch, "end_of_turn": list(family.end_of_turn),
        "template_kwargs": prep.template_kwargs, "lora_targets": lora_targets(recipe, family),
        "quantization": recipe.quantization.model_dump(), "backend": backend, "license": prep.base.license,
        "loaded": loaded,  # what the backend really trained against (read before any sharding)
    })
    old = run.root / ".adapter.old"
    shutil.rmtree(old, ignore_errors=True)
    if run.adapter.exists():
        run.adapter.rename(old)
    tmp.rename(run.adapter)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def failure_recorded(run: RunDir, main: bool):
    """A run that stops on an error says so in its manifest (`failed`, with the message) instead of
    `running` forever; a failure before any checkpoint leaves a folder the next `ft train` reuses
    (left_by_a_failed_start). Divergence and signals record their own status."""
    try:
        yield
    except Exception as exc:
        if main and run.read_manifest().get("status") == "running":
            message = exc.render() if isinstance(exc, UserError) else f"internal error: {type(exc).__name__}: {exc}"
            run.update_manifest(status="failed", ended=now(), error=message)
        raise


def train(recipe: Recipe, run: RunDir, resume: bool = False, overwrite: bool = False, console=None,
          checks: Sequence[Callable[[Recipe, data_mod.Splits], str]] = ()) -> dict:
    """Train the recipe into `run`. In a multi-process launch every rank calls this; rank 0 alone
    writes the run folder (the others pass console=None and write nothing but their share of
    each checkpoint's RNG state). Everything knowable without the weights is checked before the
    folder is made: `checks` are later stages' (the CLI hands in eval's metric and gate check)."""
    backend = pick_backend(recipe)  # first: unsloth must be imported before transformers
    logs.quiet_hf_libraries()
    from finetune.guard import NonFiniteLoss, NonFiniteWeights, StopOnNonFiniteLoss, StopOnSignal
    from finetune.preflight import preflight_train
    from finetune.progress import HeldoutLossAtStart, MetricsCallback, RichProgress, plot_loss

    w = world()
    start(w)
    prep = prepare(recipe)
    checked = [check(recipe, prep.splits) for check in checks]
    check_trackers(recipe, run)
    check_strategy(recipe, w.size, on_gpu())
    check_trl_can_train_here(on_gpu())
    check_optimizer(recipe)
    batches = batch_plan(recipe, w.size)
    shape = skeleton(recipe, prep.base)
    check_module_settings(recipe, prep.base.family, shape.model)
    preflight = preflight_train(recipe, prep.base, shape, run.root, lora_targets(recipe, prep.base.family))
    del shape
    estimate = preflight.lines
    slow_kernels = missing_kernels_note(prep.base.family, on_gpu())
    if slow_kernels:
        estimate.append(slow_kernels)
    if w.size > 1:
        estimate.append(f"{w.size} processes ({recipe.distributed.strategy}): {batches.micro_batch} examples × "
                        f"{batches.grad_accum} accumulation per process = global batch {batches.global_batch}")
    if console is not None:
        for line in checked:
            console.print(f"  checked: {line}", markup=False, highlight=False)
        for line in estimate:
            console.print(f"  preflight: {line}", markup=False, highlight=False)
    train_ds, train_report = render.tokenize_all(prep.renderer, prep.splits.train, recipe.data.max_length,
                                                 recipe.data.too_long)
    heldout_ds, heldout_report = render.tokenize_all(prep.renderer, prep.splits.heldout, recipe.data.max_length,
                                                     recipe.data.too_long)
    if console is not None:
        st = prep.splits.stats
        rows = f" in {train_report['rows']} rows" if train_report["rows"] != st["train"] else ""
        console.print(f"  data: {st['train']} training{rows} / {st['heldout']} held-out examples ({st['format']}), "
                      f"{st['leaked_removed']} leaked duplicates removed, {train_report['truncated']} truncated "
                      f"(prompt start cut), {train_report['dropped']} dropped as too long, "
                      f"{train_report['tokens']:,} tokens ({train_report['trained_tokens']:,} trained)",
                      markup=False, highlight=False)
    if resume:
        note = check_resume(run.read_manifest() if run.root.is_dir() else None, recipe, w.size)
        if note and console is not None:
            console.print(f"  {note}", markup=False, highlight=False)
    if w.main:
        checkpoint, restarted = start_run(recipe, run, resume, overwrite)  # only now is anything written
        logs.attach(run.root / "logs" / "train.log")
        if restarted and console is not None:
            console.print(f"  starting {run.root} over: {restarted}", markup=False, highlight=False)
    barrier()  # the others find the folder (and the checkpoint to resume) as rank 0 left it
    if not w.main:
        checkpoint = last_complete_checkpoint(run) if resume else None
    resumed_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    if w.main:
        atomic_write_text(run.recipe, recipe.to_yaml())
        started = run.read_manifest().get("started") if checkpoint else None
        run.update_manifest(
            name=recipe.name, status="running", started=started or now(), ended=None,
            recipe_sha256=recipe_sha256(recipe),
            data_sha256=data_hashes(recipe),
            base=base_record(prep.base),
            data={**prep.splits.stats, "train_tokens": train_report, "heldout_tokens": heldout_report},
            backend=backend, seed=recipe.train.seed, versions=package_versions(),
            git_commit=git_commit(Path(__file__).parent), hardware=hardware(),
            resumed_from=str(checkpoint) if checkpoint else None, preflight=estimate,
            linear_attention_kernels_missing=slow_kernels,
            distributed={"world_size": w.size, "strategy": recipe.distributed.strategy,
                         "micro_batch": batches.micro_batch, "grad_accum": batches.grad_accum,
                         "global_batch": batches.global_batch},
            process={"pid": os.getpid(), "host": socket.gethostname()}, error=None,
        )
        # metrics.jsonl must tell one story: drop what a killed run logged after its checkpoint
        kept = [r for r in run.read_metrics() if r.get("step", 0) <= resumed_step] if checkpoint else []
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    with failure_recorded(run, w.main):
        args = sft_config(recipe, run, batches, prep.base.family, evaluate_first=checkpoint is None)  # before the model
        model = load_model(recipe, prep, backend, preflight.gradient_checkpointing)
        loaded = loaded_facts(model)
        check_loaded(loaded, recipe, prep.base.path, backend)
        packed = recipe.train.packing and backend == "hf"  # unsloth brings its own padding-free path
        linear_attention = None
        if packed:
            kernels = segment_aware_linear_attention()
            linear_attention = kernels.describe() if on_gpu() else "ft's PyTorch version (CPU)"
        if w.main:
            run.update_manifest(loaded=loaded, packing={"enabled": packed, "linear_attention": linear_attention})
        nonfinite = StopOnNonFiniteLoss()
        progress = RichProgress(console) if w.main else None
        callbacks = [MetricsCallback(run), nonfinite] + ([progress] if progress else [])
        start_loss = HeldoutLossAtStart(run if w.main else None)
        trainer = make_trainer(model, args, prep, train_ds, heldout_ds, callbacks + [start_loss], packed)
        summary = {}
        if checkpoint is not None:
            summary["heldout_loss_start"] = run.read_manifest().get("summary", {}).get("heldout_loss_start")
        stop = StopOnSignal()
        trainer.add_callback(stop)
        try:
            result = restore_finished(trainer, checkpoint) if checkpoint is not None else None
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
        if checkpoint is None:
            summary["heldout_loss_start"] = start_loss.loss
        summary["heldout_loss_end"] = trainer.evaluate()["eval_loss"]
        summary.update(train_loss=result.training_loss, steps=trainer.state.global_step,
                       train_runtime_s=result.metrics.get("train_runtime"))
        if on_gpu():  # what the README's GPU sizes are measured by
            import torch

            summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gathered = None
        if shards(recipe):
            # FSDP / DeepSpeed hold the adapter in shards: save_model gathers it (every rank takes part)
            gathered = run.root / ".adapter.gathered"
            trainer.save_model(str(gathered))
            barrier()
        if w.main:
            save_adapter(trainer.model, prep, recipe, run, backend, loaded, gathered)
            plot_loss(run)
            run.update_manifest(status="complete", ended=now(), summary=summary)
        barrier()
        return summary


