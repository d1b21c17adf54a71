"""What every benchmark shares: running a contender in its own process, measuring it, printing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
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


def measured(argv: list[str], cwd: Path = ROOT, env: dict | None = None, quiet: bool = True) -> dict:
    """Run a command to completion; its wall time and peak resident memory (its own, read from
    wait4, so one contender's memory never counts against another)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                            text=True)
    output = proc.stdout.read() if quiet else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed ({proc.returncode}): {' '.join(argv)}\n{output[-4000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "output": output}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json: the figures bench/RESULTS.md quotes (written by the last run)."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
