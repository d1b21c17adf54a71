"""The run folder: the one unit `ft train` writes and `ft eval` / `ft export` read, and its life.

    runs/<name>/
      recipe.yaml       the resolved recipe (absolute paths, every default filled in)
      manifest.json     hashes, versions, hardware, seed, times, status, data and loss summary
                        (the `Manifest` record below: the one reader and writer)
      metrics.jsonl     one JSON object per logged step (train loss, lr, held-out loss, tokens/s)
      loss.png          train and held-out loss curves
      adapter/          adapter_model.safetensors, adapter_config.json, tokenizer, recipe.yaml,
                        chat_template.train.jinja, ft_adapter.json: the folder describes itself
                        (finetune/adapter.py)
      checkpoints/      checkpoint-N folders (model, optimizer, scheduler, RNG) for --resume
      eval/  export/    written by `ft eval` and `ft export`

Besides the paths, this module keeps the rules of a run's life: what a start may reuse or must
refuse (recipe and data hashes, a failed start's folder), which checkpoints are complete, how a
failure is recorded, and where ft caches what it builds ($FT_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.errors import UserError

RUNS_DIR = Path("runs")
PACKAGES = ("ft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "gguf", "llama_cpp_python", "unsloth")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside the target and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


class Record(BaseModel):
    """A file ft writes and reads back: every field typed, its default here and nowhere else.
    Unknown fields are kept (a newer ft's manifest read by an older one loses nothing)."""

    model_config = ConfigDict(extra="allow")


RunStatus = Literal["running", "failed", "interrupted", "diverged", "complete"]


class ProcessRecord(Record):
    pid: int
    host: str


class DistributedRecord(Record):
    world_size: int = 1
    strategy: str = "ddp"
    micro_batch: int = 0
    grad_accum: int = 1
    global_batch: int = 0


class DataHashes(Record):
    """sha256 of every data file: a resumed run must see the data it started with."""

    train: dict[str, str | None] = Field(default_factory=dict)
    heldout: dict[str, str | None] = Field(default_factory=dict)


class BaseRecord(Record):
    name: str
    path: str
    family: str
    weights: str
    source: dict[str, Any] | None = None  # SOURCE.json of a base ft built from a package


class PackingRecord(Record):
    enabled: bool
    linear_attention: str | None = None


class RehearsalRecord(Record):
    """train.rehearsal as it ran: the base's answers mixed into the training rows."""

    share: float  # train.rehearsal
    prompts: int  # distinct general prompts answered
    rows: int  # rehearsal rows added to the training split
    cached: bool  # the base's answers came from the cache (else generated at the start of this run)


class TrainSummary(Record):
    """What a finished (or finishing) run measured; None until measured."""

    heldout_loss_start: float | None = None
    heldout_loss_end: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    train_runtime_s: float | None = None
    peak_gpu_memory_gib: float | None = None


class Manifest(Record):
    """manifest.json. Written field by field as the run goes (`RunDir.update_manifest`)."""

    name: str | None = None
    status: RunStatus | None = None
    started: str | None = None
    ended: str | None = None
    error: str | None = None  # a failed start's message
    recipe_sha256: str | None = None
    data_sha256: DataHashes = Field(default_factory=DataHashes)
    base: BaseRecord | None = None
    data: dict[str, Any] = Field(default_factory=dict)  # split and token counts (a report: not read back)
    backend: str | None = None
    backend_fallback: str | None = None  # why train.backend auto trained with hf on a GPU (unsloth did not import)
    seed: int | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    git_commit: str | None = None
    hardware: dict[str, Any] = Field(default_factory=dict)
    resumed_from: str | None = None
    preflight: list[str] = Field(default_factory=list)
    linear_attention_kernels_missing: str | None = None
    distributed: DistributedRecord | None = None
    process: ProcessRecord | None = None
    loaded: dict[str, Any] | None = None  # what the backend loaded (finetune/train/backends.loaded_facts)
    packing: PackingRecord | None = None
    rehearsal: RehearsalRecord | None = None
    summary: TrainSummary = Field(default_factory=TrainSummary)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None where no run has started here."""
        if not self.manifest.is_file():
            return None
        return Manifest.model_validate_json(self.manifest.read_text(encoding="utf-8"))

    def update_manifest(self, **fields) -> Manifest:
        """Set these fields (records or plain values), keep the rest, write atomically."""
        current = (self.read_manifest() or Manifest()).model_dump(mode="json")
        given = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in fields.items()}
        manifest = Manifest.model_validate(current | given)
        write_json(self.manifest, manifest.model_dump(mode="json"))
        return manifest

    def update_summary(self, **fields) -> Manifest:
        manifest = self.read_manifest() or Manifest()
        return self.update_manifest(summary=manifest.summary.model_copy(update=fields))

    def log_metrics(self, record: dict) -> None:
        # Appends are line-sized and flushed: a crash loses at most the line being written.
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
        return rows

    def trained_tokens(self) -> int:
        """Tokens trained so far: the largest count a training row logged (metrics.jsonl holds
        training and evaluation rows, and only training rows count tokens)."""
        return max((int(r["num_tokens"]) for r in self.read_metrics() if "num_tokens" in r), default=0)

    def keep_metrics_through(self, step: int) -> None:
        """metrics.jsonl must tell one story: drop what a killed run logged after its checkpoint."""
        kept = [r for r in self.read_metrics() if r["step"] <= step] if step else []
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


def run_for(name: str, output: str | None) -> RunDir:
    root = Path(output) if output else RUNS_DIR / name
    return RunDir(root.resolve())


def find_run(path: str | None) -> RunDir:
    """The run a command acts on: the given folder, or the newest complete run under runs/."""
    if path:
        run = RunDir(Path(path).resolve())
        if not run.recipe.is_file():
            raise UserError(f"not a run folder (no recipe.yaml): {path}", "RUN",
                            "pass a folder written by `ft train`, e.g. runs/<name>")
        return run
    candidates = sorted((p for p in RUNS_DIR.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError("no runs found under runs/", "RUN", "train one first: ft train RECIPE")
    return RunDir(candidates[-1].parent.resolve())


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "ram_gib": _ram_gib()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def cache_root() -> Path:
    """Where ft keeps what it builds once and reuses (twins, packaged bases, base eval columns)."""
    return Path(os.environ.get("FT_CACHE", Path.home() / ".cache" / "ft"))


# --- checkpoints --------------------------------------------------------------------------------

def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders with their trainer state, oldest first. A folder that lacks it was torn
    (possible only for checkpoints written by something other than SafeTrainer) and is ignored."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def last_complete_checkpoint(run: RunDir) -> Path | None:
    done = complete_checkpoints(run.checkpoints)
    return done[-1] if done else None


# --- starting, resuming, failing ----------------------------------------------------------------

def recipe_sha256(recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def data_hashes(recipe) -> DataHashes:
    from finetune.data import sha256_file

    heldout = recipe.data.heldout
    return DataHashes(train={s.path: sha256_file(s.path) for s in recipe.data.sources},
                      heldout={heldout: sha256_file(heldout)} if heldout else {})


def check_data_unchanged(manifest: Manifest | None, recipe) -> None:
    """A resumed run must see the data it started with: the split, the order and the step count
    all depend on it, and the manifest would describe data the adapter was not trained on."""
    if manifest is None:
        return
    now_hashes = data_hashes(recipe)
    for key in ("train", "heldout"):
        current = getattr(now_hashes, key)
        for path, digest in getattr(manifest.data_sha256, key).items():
            if digest and current.get(path) != digest:  # a file no longer named: changed too
                raise UserError(f"the data file changed since this run started: {path}", f"data.{key}",
                                "restore the file as it was to resume, or start a new run (--overwrite or --output DIR)")


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


def left_by_a_failed_start(run: RunDir) -> str | None:
    """Why an existing run folder holds nothing worth keeping, or None. A start that stopped before
    any checkpoint was saved (a user error found once the model loaded, a crash, a killed process)
    left a manifest and logs but no trained weights: running the fixed recipe into it just works.
    A folder with a complete checkpoint or an adapter stays protected."""
    manifest = run.read_manifest()
    if manifest is None or complete_checkpoints(run.checkpoints) or run.adapter.exists():
        return None
    if manifest.status in ("failed", "interrupted", "diverged"):
        return f"its start {manifest.status} before any checkpoint was saved"
    process = manifest.process
    if (manifest.status == "running" and process is not None and process.host == socket.gethostname()
            and not process_alive(process.pid)):
        return f"the process that started it (pid {process.pid}) is gone and no checkpoint was saved"
    return None


def start_run(recipe, run: RunDir, resume: bool, overwrite: bool) -> tuple[Path | None, str | None]:
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
        if old is not None and old.recipe_sha256 != recipe_sha256(recipe):
            raise UserError("the recipe changed since this run started", str(run.recipe),
                            "resume with the same recipe and overrides, or start a new run")
        check_data_unchanged(old, recipe)
        checkpoint = last_complete_checkpoint(run)
    run.root.mkdir(parents=True, exist_ok=True)
    return checkpoint, restarted


@contextmanager
def failure_recorded(run: RunDir, main: bool):
    """A run that stops on an error says so in its manifest (`failed`, with the message) instead of
    `running` forever; a failure before any checkpoint leaves a folder the next `ft train` reuses
    (left_by_a_failed_start). Divergence and signals record their own status."""
    try:
        yield
    except Exception as exc:
        manifest = run.read_manifest() if main else None
        if manifest is not None and manifest.status == "running":
            message = exc.render() if isinstance(exc, UserError) else f"internal error: {type(exc).__name__}: {exc}"
            run.update_manifest(status="failed", ended=now(), error=message)
        raise
