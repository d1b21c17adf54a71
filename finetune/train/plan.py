"""Everything `ft train` checks before it loads weights, in one function that `ft validate` and the
multi-process launcher call too: a recipe `ft validate` passes is one `ft train` starts.

The checks, in order: the backend (unsloth is imported here, before transformers, when it is
used), the base and its weights' format, the data (read, split, leakage), later stages' checks
(eval's metrics and gates, handed in by the CLI), trackers, the distributed strategy, TRL, the
optimizer, the batch plan; then, with the model's tokenizer and config: the chat template, every
row tokenized under `data.too_long`, the LoRA targets and skipped modules on the meta-device
skeleton, and preflight's disk and memory estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from finetune import data as data_mod
from finetune import logs
from finetune import render
from finetune.bases import ResolvedBase, hub_reachable, resolve_base
from finetune.distributed import BatchPlan, batch_plan, check_strategy, shards
from finetune.errors import UserError
from finetune.loading import Prepared, check_weights_format, on_gpu, prepare, skeleton, training_template
from finetune.loading import lora_targets
from finetune.preflight import TrainPlan, preflight_train
from finetune.recipe import Recipe
from finetune.train.backends import auto_fallback, pick_backend
from finetune.train.lora import check_module_settings
from finetune.train.packing import missing_kernels_note
from finetune.train.trainer import check_optimizer, check_trackers, check_trl_can_train_here

StageCheck = Callable[[Recipe, data_mod.Splits], str]  # a later stage's check; returns what it checked


@dataclass
class TrainingPlan:
    """What the checks found, and what training goes on with."""

    backend: str
    base: ResolvedBase
    splits: data_mod.Splits
    batches: BatchPlan
    checked: list[str] = field(default_factory=list)  # one line per check that ran ("what, and that it holds")
    stage_checks: list[str] = field(default_factory=list)  # the later stages' lines among them
    not_checked: str | None = None  # why the checks that need the model's files did not run
    prep: Prepared | None = None  # tokenizer, template, renderer (None when not_checked)
    preflight: TrainPlan | None = None
    slow_kernels: str | None = None
    backend_fallback: str | None = None  # why auto did not get unsloth on a GPU (backends.auto_fallback)
    rehearsal_share: float = 0.0  # train.rehearsal decided (rehearsal_share)
    train_dataset: object = None  # datasets.Dataset of input_ids and labels, as TRL takes them
    heldout_dataset: object = None
    train_tokens: dict = field(default_factory=dict)  # render.tokenize_all's report
    heldout_tokens: dict = field(default_factory=dict)

    @property
    def estimate(self) -> list[str]:
        """preflight's lines and the slow-kernel note: printed by `ft train` and kept in the manifest."""
        lines = list(self.preflight.lines) if self.preflight else []
        if self.backend_fallback:
            lines.append(self.backend_fallback)
        if self.slow_kernels:
            lines.append(self.slow_kernels)
        if self.batches.world_size > 1:
            b = self.batches
            lines.append(f"{b.world_size} processes: {b.micro_batch} examples × {b.grad_accum} accumulation "
                         f"per process = global batch {b.global_batch}")
        return lines

    def data_line(self) -> str:
        st, tr = self.splits.stats, self.train_tokens
        rows = f" in {tr['rows']} rows" if tr["rows"] != st["train"] else ""
        return (f"data: {st['train']} training{rows} / {st['heldout']} held-out examples ({st['format']}), "
                f"{st['leaked_removed']} leaked duplicates removed, {tr['truncated']} truncated "
                f"(prompt start cut), {tr['dropped']} dropped as too long, "
                f"{tr['tokens']:,} tokens ({tr['trained_tokens']:,} trained)")


def rehearsal_share(recipe: Recipe, backend: str) -> tuple[float, str | None]:
    """train.rehearsal decided: (share, why auto turned it off). The base's answers are generated
    when training starts, on the model about to train: under fsdp / deepspeed the base is not yet
    on one device then (rank 0 holds it in CPU RAM until the strategy places it), and unsloth's
    patched model is not exercised here; auto leaves those off, an explicit share is refused
    where it cannot run."""
    from finetune.recipe import AUTO_REHEARSAL

    chosen = recipe.train.rehearsal
    sharded = shards(recipe)
    if chosen == "auto":
        if sharded:
            return 0.0, f"train.rehearsal auto: off under distributed.strategy {recipe.distributed.strategy}"
        if backend != "hf":
            return 0.0, "train.rehearsal auto: off on the unsloth backend"
        return AUTO_REHEARSAL, None
    if chosen and sharded:
        raise UserError(f"train.rehearsal {chosen:g} cannot run under distributed.strategy "
                        f"{recipe.distributed.strategy}: the base's answers are generated before the strategy "
                        "places the model", "train.rehearsal", "set train.rehearsal: 0, or train with ddp")
    return float(chosen), None


def model_files_here(base: ResolvedBase) -> bool:
    """A local folder, or a hub checkpoint that is cached or can be downloaded."""
    return Path(base.path).is_dir() or hub_reachable(base.path)


def plan_training(recipe: Recipe, run_root: Path, world_size: int = 1, checks: Sequence[StageCheck] = (),
                  without_model_files: bool = False) -> TrainingPlan:
    """Run every check `ft train` makes before loading weights; raises UserError at the first
    failing one. `without_model_files`: `ft validate`'s leave, for a hub base this machine cannot
    reach, to skip (and say so) the checks that need the model's tokenizer and config; `ft train`
    never takes it (it downloads them, or fails saying why)."""
    backend = pick_backend(recipe)  # first: unsloth must be imported before transformers
    logs.quiet_hf_libraries()  # then transformers' and datasets' bars off before any data is read
    fallback = auto_fallback(recipe, backend)
    checked = [f"train.backend {recipe.train.backend}: {backend}" + (f" ({fallback})" if fallback else "")]
    share, rehearsal_off = rehearsal_share(recipe, backend)
    if rehearsal_off:
        checked.append(rehearsal_off)
    base = resolve_base(recipe.model.base)
    check_weights_format(base, recipe)
    checked.append(f"model: {recipe.model.base} → {base.path} (family {base.family.name})")
    have_files = not without_model_files or model_files_here(base)
    prep = prepare(recipe, base) if have_files else None
    splits = prep.splits if prep else data_mod.load_splits(recipe)
    s = splits.stats
    checked.append(f"data: {s['train']} training / {s['heldout']} held-out examples, format {splits.format}, "
                   f"{s['leaked_removed']} leaked duplicates removed")
    stage_checks = [check(recipe, splits) for check in checks]
    checked += stage_checks
    check_trackers(recipe)
    check_strategy(recipe, world_size, on_gpu())
    check_trl_can_train_here(on_gpu())
    check_optimizer(recipe)
    checked.append(f"train.optimizer {recipe.train.optimizer}: known to transformers and installed"
                   + (f"; trackers {', '.join(recipe.train.report_to)} installed" if recipe.train.report_to else ""))
    plan = TrainingPlan(backend, base, splits, batch_plan(recipe, world_size), checked, stage_checks, prep=prep,
                        backend_fallback=fallback, rehearsal_share=share)
    if prep is None:
        template, where = training_template(recipe, base.family)
        render.check_template(template, base.family, render.template_kwargs(base.family, recipe), where, None)
        plan.not_checked = (f"{base.path} is a hub model this machine cannot reach: its tokenizer, the rows' "
                            "lengths, lora.targets and memory are checked when ft train downloads it")
        checked.append(f"chat template {where}: every assistant turn trains its end-of-turn token "
                       f"({' / '.join(base.family.end_of_turn)})")
        return plan
    plan.train_dataset, plan.train_tokens = render.tokenize_all(prep.renderer, splits.train, recipe.data.max_length,
                                                             recipe.data.too_long)
    plan.heldout_dataset, plan.heldout_tokens = render.tokenize_all(prep.renderer, splits.heldout,
                                                                 recipe.data.max_length, recipe.data.too_long)
    checked.append(f"chat template {prep.renderer.template_where}: every assistant turn trains its end-of-turn token "
                   f"({' / '.join(base.family.end_of_turn)}); every row tokenized (data.too_long "
                   f"{recipe.data.too_long}: {plan.train_tokens['truncated']} truncated, "
                   f"{plan.train_tokens['dropped']} dropped)")
    shape = skeleton(recipe, base)
    check_module_settings(recipe, base.family, shape.model)
    targets = lora_targets(recipe, base.family)
    checked.append(f"lora.targets: {', '.join(targets)} (each a module of this model)")
    plan.preflight = preflight_train(recipe, base, shape, run_root, targets)
    plan.slow_kernels = missing_kernels_note(base.family, on_gpu())
    checked += [f"preflight {line}" for line in plan.estimate]
    return plan
