"""The run folder: the one unit `ft train` writes and `ft eval` / `ft export` read.

    runs/<name>/
      recipe.yaml       the resolved recipe (absolute paths, every default filled in)
      manifest.json     hashes, versions, hardware, seed, times, status, data and loss summary
      metrics.jsonl     one JSON object per logged step (train loss, lr, held-out loss, tokens/s)
      loss.png          train and held-out loss curves
      adapter/          adapter_model.safetensors, adapter_config.json, tokenizer, recipe.yaml,
                        chat_template.jinja, ft_adapter.json: the folder describes itself
      checkpoints/      checkpoint-N folders (model, optimizer, scheduler, RNG) for --resume
      eval/  export/    written by `ft eval` and `ft export`
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from finetune.errors import UserError

RUNS_DIR = Path("runs")
PACKAGES = ("ft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "gguf", "llama_cpp_python", "unsloth")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


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

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text(encoding="utf-8")) if self.manifest.is_file() else {}

    def update_manifest(self, **fields) -> dict:
        manifest = self.read_manifest() | fields
        write_json(self.manifest, manifest)
        return manifest

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
