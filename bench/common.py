"""What every benchmark shares: running a contender in its own process, measuring it, printing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


def status_field(pid: int, field: str) -> int | None:
    """A memory field of /proc/PID/status in bytes: VmHWM (peak RSS; unlike rusage it starts fresh
    at exec, so a child forked from this large benchmark process is not charged with the parent's
    memory) or RssAnon (anonymous memory now: RSS less the file pages mapped from disk, such as a
    memory-mapped checkpoint or GGUF, which the kernel can drop and re-read)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_of(pid: int) -> int | None:
    return status_field(pid, "VmHWM")


def measured(argv: list[str], cwd: Path = ROOT, env: dict | None = None, check: bool = True) -> dict:
    """Run a command to completion: its wall time, its output, its peak resident memory (the
    high-water mark of the process, sampled every 50 ms while it runs; it only ever grows, so
    the last sample is the peak up to 50 ms before exit) and the largest anonymous memory seen
    in those samples (no high-water mark exists for it: a spike shorter than 50 ms can be missed)."""
    import threading

    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak, anon = [0], [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_rss_of(proc.pid) or 0)
            anon[0] = max(anon[0], status_field(proc.pid, "RssAnon") or 0)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    proc.wait()
    sampler.join()
    wall = time.monotonic() - start
    if proc.returncode != 0 and check:
        sys.exit(f"benchmark step failed ({proc.returncode}): {' '.join(argv)}\n{output[-4000:]}")
    return {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mib": peak[0] / 2**20,
            "peak_anon_mib": anon[0] / 2**20, "output": output}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def table(headers: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        if isinstance(c, float):
            return f"{c:,.2f}"
        return f"{c:,}" if isinstance(c, int) else str(c)

    cells = [headers] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_random_checkpoint(folder: Path, shapes: dict, shard_bytes: int, norms: float) -> int:
    """Seeded random bf16 tensors of `shapes`, written shard by shard with an index (never the
    whole model in memory); 1-D norm weights are the constant `norms` (0 for Qwen3.5's offsets
    from 1, 1 elsewhere). Returns the bytes of tensor data."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shard, size, index, total, number = {}, 0, {}, 0, 1

    def flush():
        nonlocal shard, size, number
        name = f"model-{number:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size, number = {}, 0, number + 1

    for key, shape in shapes.items():
        if key.endswith("norm.weight") and len(shape) == 1:
            tensor = torch.full(tuple(shape), float(norms), dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    return total


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json: the figures bench/RESULTS.md quotes (written by the last run)."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def per_cpu_kind(name: str) -> str:
    """A CPU bench's result name: the figures of a CPU without native bf16 kept beside, not over,
    those of one with it (the two take different paths: fp32 there, bf16 autocast here)."""
    from finetune.loading import native_bf16_cpu

    return name if native_bf16_cpu() else f"{name}_no_native_bf16"


def cache_dir() -> Path:
    from finetune.run import cache_root

    path = cache_root() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_cpp_converter() -> Path:
    """llama.cpp's own converter (vendor/llama.cpp in the llama-cpp-python source release of the installed
    version, with its gguf-py), fetched from PyPI once into $FT_CACHE/bench: the reference ft's converter
    is compared with (bench/export_memory.py, tests/test_real_model.py). Never committed."""
    version = metadata.version("llama_cpp_python")
    root = cache_dir() / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(download)], check=True, capture_output=True)
    with tarfile.open(next(download.glob("*.tar.gz"))) as tar:
        wanted = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)]
        tar.extractall(cache_dir(), members=wanted, filter="data")
    shutil.rmtree(download)
    return script
