"""A GPU user's `pip install '.[unsloth]'` must resolve: unsloth pins transformers<=5.17,
trl<=1.15 and datasets<5, so ft's own ranges have to admit those versions too. Resolved with
`uv pip compile` (metadata only, nothing installed) for a Linux x86_64 target."""

from __future__ import annotations

import os
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


def test_the_wheel_holds_every_package_and_every_file_ft_reads(tmp_path):
    """A user's `pip install ft` gets what a checkout has: every package (a subpackage left out of
    pyproject's list is silently missing from the wheel), every data file ft reads at run time
    (chat templates, the twins' corpus, the shipped recipes `ft models --sizes` estimates at); and
    `ft models --sizes` runs from the installed files alone, outside the checkout."""
    import sys
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("ft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    source = set()
    for package in ("finetune", "export", "eval"):
        for f in (ROOT / package).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                source.add(f.relative_to(ROOT).as_posix())
    assert sorted(source - names) == []
    assert {"finetune/recipes/support.yaml", "finetune/templates/qwen3_5.jinja", "finetune/twin_corpus.txt"} <= names

    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", "import finetune, sys; print(finetune.__file__); "
                          "from finetune.cli import main; sys.argv = ['ft', 'models', '--sizes']; main()"],
                         capture_output=True, text=True, timeout=600, cwd=elsewhere,
                         env={**os.environ, "PYTHONPATH": str(installed)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith(str(installed))
    assert "GiB" in run.stdout and "(recipes/support.yaml)" in run.stdout
