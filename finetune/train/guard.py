"""Training that does not lose work: checkpoints appear whole or not at all, Ctrl-C and SIGTERM
save a checkpoint and stop, and a loss that stops being finite stops the run before a bad
checkpoint is written. (The order of the rows, which a resumed run must see again:
finetune/train/order.py.)
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback
from trl import SFTTrainer

from finetune.distributed import any_rank
from finetune.run import complete_checkpoints
from finetune.train import shared_prefix as prefix
from finetune.train.order import train_sampler
from finetune.train.packing import REAL_TOKENS

STAGING = ".staging"


class NonFiniteWeights(Exception):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite adapter weights at step {step}")


class NonFiniteLoss(Exception):
    """A training step's loss was nan or inf: raised inside that step, before its update is logged
    or saved. (transformers' logging_nan_inf_filter, on by default, would hide it from the logs.)"""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss {loss} at step {step}")


class SafeTrainer(SFTTrainer):
    """TRL's SFTTrainer, with checkpoints written into `checkpoints/.staging/` and renamed into
    place only once complete (a rename within one folder is atomic), and never with non-finite
    adapter weights."""

    _staging: Path | None = None

    def __init__(self, *args, padded_rows: bool = True, shared_prefix: bool = False, **kwargs):
        self.padded_rows = padded_rows  # one example a row (TRL pads them): its sampler may sort a step's rows
        self.shared_prefix = shared_prefix  # a micro-batch's common leading tokens computed once
        if shared_prefix:
            prefix.install()
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial=None) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial) -> None:
        # Several processes: every rank writes its part (its RNG state, shards under FSDP or
        # DeepSpeed) into staging; rank 0 alone clears staging before and renames it after.
        local = any(not torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
        if any_rank(local, self.args.device):  # every rank stops, or none: see distributed.any_rank
            raise NonFiniteWeights(self.state.global_step)
        final = Path(self.args.output_dir)
        staging = final / STAGING
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if main:
            name = f"checkpoint-{self.state.global_step}"
            # transformers pickles its arguments here; ft never reads them back, so no pickle is kept
            (staging / name / "training_args.bin").unlink(missing_ok=True)
            target = final / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            shutil.rmtree(staging, ignore_errors=True)
            for old in complete_checkpoints(final)[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _get_train_sampler(self, train_dataset=None):
        chosen = super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return train_sampler(chosen, dataset, self.args, self.padded_rows)

    def _get_eval_sampler(self, eval_dataset):
        # The held-out loss on the same batches whatever train.group_by_length says: transformers
        # would group them too, and its loss is a mean of the batches' means.
        if self.args.train_sampling_strategy == "group_by_length" and eval_dataset is not None:
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        return super()._get_eval_sampler(eval_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One host sync per micro-batch, the one transformers' nan filter made. Every rank must
        # stop together, or the others would wait for it in the next all-reduce.
        bad = (~torch.isfinite(loss.detach())).float()
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item():
            value = float(loss) if not torch.isfinite(loss) else float("nan")
            raise NonFiniteLoss(self.state.global_step + 1, value)  # the step being taken
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # ft counts the real tokens of every training batch itself. TRL counts them in its own
        # compute_loss, but unsloth replaces that with transformers' (no count at all: no tokens/s,
        # no num_tokens in metrics.jsonl); and TRL reads a batch without attention_mask as one row
        # of position_ids, while a packed batch has several rows and padding (its collator says
        # how many real tokens it holds).
        real = inputs.pop(REAL_TOKENS, None)
        if real is None:
            mask = inputs.get("attention_mask")
            real = mask.sum() if mask is not None else inputs["input_ids"].numel()
        before = getattr(self, "_total_train_tokens", 0)
        padded = "attention_mask" in inputs and "labels" in inputs
        shared = prefix.shared_length(inputs["input_ids"], inputs["attention_mask"], inputs["labels"]) \
            if self.shared_prefix and padded and not return_outputs else 0
        if shared:
            result = self.loss_with_shared_prefix(model, inputs, shared, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            real = self.accelerator.gather_for_metrics(torch.as_tensor(real, device=inputs["input_ids"].device))
            self._total_train_tokens = before + int(real.sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    def loss_with_shared_prefix(self, model, inputs, shared: int, num_items_in_batch):
        """The loss of a padded micro-batch whose rows begin with the same `shared` tokens: those
        run once through the decoder (no head: nothing there is scored), the rows' remainders
        then through TRL's loss as the batch (finetune/train/shared_prefix.py)."""
        head, rest = prefix.split_batch(inputs, shared)
        decoder = self.accelerator.unwrap_model(model).get_base_model().get_decoder()
        with prefix.PrefixPass() as passes:
            with self.accelerator.autocast():  # as the model's own forward runs (accelerate wraps it)
                decoder(**head, use_cache=False)
            with passes.suffixes():
                loss = super().compute_loss(model, rest, False, num_items_in_batch)
            if passes.leftover():
                raise RuntimeError(f"the shared prefix's tensors were not all read: {passes.leftover()} left")
        return loss


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, stop. A second signal gets
    the default behaviour (immediate exit), so a stuck run can still be killed."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


class StopOnNonFiniteLoss(TrainerCallback):
    """A loss of nan or inf stops the run without saving: the last checkpoint stays the last good one."""

    def __init__(self):
        self.step: int | None = None
        self.loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.step, self.loss = state.global_step, loss
            control.should_save = False
            control.should_training_stop = True
