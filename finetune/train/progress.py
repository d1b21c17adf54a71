"""What a run shows while it trains (a rich progress bar) and what it keeps (metrics.jsonl, loss.png)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn
from transformers import TrainerCallback

from finetune.run import RunDir


class MetricsCallback(TrainerCallback):
    """Appends every log (train loss, lr, held-out loss) to metrics.jsonl, with tokens/s."""

    def __init__(self, run: RunDir):
        self.run = run
        self.last = None  # (time, num_tokens) at the previous log
        self.started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:  # one writer per run folder
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        tokens = logs.get("num_tokens")
        if tokens is not None:
            t = time.monotonic()
            # seconds since train() began: what a benchmark times from step k on (skipping warm-up) reads
            record["elapsed_s"] = round(t - self.started, 3)
            if self.last is not None and t > self.last[0]:
                record["tokens_per_s"] = round((tokens - self.last[1]) / (t - self.last[0]), 1)
            self.last = (t, tokens)
        self.run.log_metrics(record)


class HeldoutLossAtStart(TrainerCallback):
    """The first held-out evaluation (eval_on_start: see finetune/train/trainer.sft_config), written into
    the manifest as soon as it is known."""

    def __init__(self, run: RunDir | None):
        self.run = run  # None on ranks other than 0: they write nothing
        self.loss = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.loss is None and metrics and "eval_loss" in metrics:
            self.loss = metrics["eval_loss"]
            if self.run is not None:
                self.run.update_summary(heldout_loss_start=self.loss)


class RichProgress(TrainerCallback):
    """Progress bar with step, loss, tokens/s and ETA; replaces transformers' tqdm."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None
        self.loss = float("nan")
        self.tokens_per_s = 0.0
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="–", tps="–")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.progress is None:
            return
        if "loss" in logs:
            self.loss = logs["loss"]
        tokens = logs.get("num_tokens")
        if tokens is not None:
            t = time.monotonic()
            if self.last is not None and t > self.last[0]:
                self.tokens_per_s = (tokens - self.last[1]) / (t - self.last[0])
            self.last = (t, tokens)
        self.progress.update(self.task, loss=f"{self.loss:.4f}",
                             tps=f"{self.tokens_per_s:,.0f}" if self.tokens_per_s else "–")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def plot_loss(run: RunDir) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    heldout = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if heldout:
        ax.plot(*zip(*heldout), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(run.root.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run.loss_plot.with_name(".loss.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(run.loss_plot)
