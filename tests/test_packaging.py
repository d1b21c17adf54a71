"""A GPU user's `pip install '.[unsloth]'` must resolve: unsloth pins transformers<=5.17,
trl<=1.15 and datasets<5, so ft's own ranges have to admit those versions too. Resolved with
`uv pip compile` (metadata only, nothing installed) for a Linux x86_64 target."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def compile_requirements(*extra: str) -> dict[str, str]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not installed (it comes with the test extra)")
    cmd = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), *sum((["--extra", e] for e in extra), []),
           "--python-version", "3.11", "--python-platform", "x86_64-unknown-linux-gnu", "--no-header",
           "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and ("dns error" in result.stderr.lower() or "connect" in result.stderr.lower()):
        pytest.skip("package index unreachable")
    assert result.returncode == 0, result.stderr[-3000:]
    pins = {}
    for line in result.stdout.splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.split()[0]
    return pins


def version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def test_unsloth_extra_resolves_with_a_recent_unsloth():
    pins = compile_requirements("unsloth")
    assert version(pins["unsloth"]) >= (2026, 3)  # new enough for Qwen3.5
    assert version(pins["transformers"]) <= (5, 17, 99)
    assert version(pins["trl"]) <= (1, 15, 99)
    assert version(pins["datasets"]) < (5,)
    assert pins["llama-cpp-python"] == "0.3.36"
