"""`ft eval --served URL` (eval/served.py): the held-out set through a real OpenAI-compatible
server, started here on loopback: llama-cpp-python's server (the pinned llama.cpp, which Ollama's
own runner is built from) serving the exported GGUF.

Checked: the served column answers as the GGUF column does on the same file (zero divergence,
same metrics, loss shown as not available, speed figures from real requests); a server rendering
another template shows up as divergence with its likely cause; gates hold on the served column
(exit 3); every bad input (unreachable URL, unknown model, a server that is not OpenAI-compatible,
a server that never answers) is one message, exit 2, and leaves eval/ as it was. Not exercised
here: Ollama itself (not installable from a package registry), a server that streams no
finish_reason.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from eval import served as S
from eval.columns import Generation
from export.runner import export_run
from finetune.run import RunDir
from tests.conftest import free_port, run_ft, start_server

pytestmark = pytest.mark.slow
FEW = ["--set", "eval.max_examples=6", "--set", "eval.max_new_tokens=32", "--set", "eval.general.enabled=false"]


@pytest.fixture(scope="module")
def exported(qwen_run, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("served") / "run")
    shutil.copytree(qwen_run.root, run.root, ignore=shutil.ignore_patterns("export", "eval", "checkpoints"))
    export_run(run, "q4_k_m", verify=False, progress=lambda m: None)
    return run


@pytest.fixture(scope="module")
def server(exported):
    proc, url = start_server(next(exported.export_dir.glob("*-q4_k_m.gguf")))
    yield url
    proc.kill()
    proc.wait()


def report_of(run: RunDir) -> dict:
    return json.loads((run.eval_dir / "report.json").read_text())


def test_the_served_column_answers_as_the_shipped_file_does(exported, server):
    """llama-cpp-python's server applies its own default repeat penalty (1.1) to chat requests: an
    application that wants the file's greedy answers sends repeat_penalty 1 (as ft's Modelfile sets
    it for Ollama), and so does this check (`--request-field`)."""
    result = run_ft("eval", str(exported.root), "--served", server, "--concurrency", "2",
                    "--request-field", "repeat_penalty=1", *FEW)
    assert result.returncode == 0, result.stderr[-3000:]
    report = report_of(exported)
    assert report["columns"] == ["base", "fine-tuned", "gguf", "served"]
    served = report["served"]
    assert served["model"] == "support" and served["divergence"]["differ"] == 0, served["divergence"]
    assert served["request_fields"] == {"repeat_penalty": 1}
    predictions = [json.loads(line) for line in (exported.eval_dir / "predictions.jsonl").read_text().splitlines()]
    for p in predictions:
        assert p["outputs"]["served"] == p["outputs"]["gguf"]  # text and clean stop, prompt by prompt
    metrics = {m["name"]: m for m in report["metrics"]}
    assert metrics["json_valid"]["values"]["served"] == metrics["json_valid"]["values"]["gguf"]
    assert {m["name"] for m in served["metrics"]} == set(metrics) - {"loss", "perplexity"}
    speed = served["speed"]
    assert speed["requests"] == 6 and speed["concurrency"] == 2 and speed["output_tokens"] > 0
    assert 0 < speed["latency_p50_s"] <= speed["latency_p95_s"] and speed["first_token_p50_s"] > 0
    markdown = (exported.eval_dir / "report.md").read_text()
    assert "## What the server answers" in markdown and "Loss and perplexity: not available" in markdown
    assert "0 of 6 answers differ from the GGUF column's" in result.stdout


def test_a_server_rendering_another_template_shows_as_divergence(exported):
    """The same file behind a server told to use Llama 2's chat format: another prompt reaches the
    model, so answers differ from the first word, and the report says that is the likely cause."""
    proc, url = start_server(next(exported.export_dir.glob("*-q4_k_m.gguf")), "--chat_format", "llama-2")
    try:
        result = run_ft("eval", str(exported.root), "--served", url, *FEW)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    divergence = report_of(exported)["served"]["divergence"]
    assert divergence["differ"] >= 4, divergence
    assert any("another prompt" in e["likely_cause"] for e in divergence["examples"]), divergence["examples"]


def test_a_gate_holds_on_the_served_column(exported, server):
    result = run_ft("eval", str(exported.root), "--served", server, *FEW, "--set", "eval.require.json_valid=5")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "gate FAILED: json_valid (served)" in result.stdout


def test_likely_causes_read_from_the_answers():
    eot = ["<|im_end|>"]
    assert "stop that did not fire" in S.likely_cause(Generation('{"a": 1}', True), Generation('{"a": 1} and more', False), eot)
    assert "stop that did not fire" in S.likely_cause(Generation("x", True), Generation("x<|im_end|>y", True), eot)
    assert "stopped early" in S.likely_cause(Generation("abc def", False), Generation("abc", True), eot)
    assert "another prompt" in S.likely_cause(Generation("abc", True), Generation("xyz", True), eot)
    assert "sampling option" in S.likely_cause(Generation("abc", True), Generation("abd", True), eot)


def test_percentiles_are_values_a_request_took():
    assert S.percentile([0.3, 0.1, 0.2, 0.4], 0.5) == 0.2 and S.percentile([0.3, 0.1, 0.2, 0.4], 0.95) == 0.4


class Silent:
    """A TCP server that accepts and never answers: a server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


@pytest.fixture
def not_openai():
    """A plain HTTP file server: answers, but not the API (404 on /v1/models)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.kill()


@pytest.mark.parametrize("case", ["unreachable", "unknown model", "not openai", "timeout"])
def test_bad_server_input_is_one_message_and_exit_2(exported, server, not_openai, case):
    before = sorted(p.name for p in exported.eval_dir.iterdir()) if exported.eval_dir.is_dir() else []
    stamp = {p.name: p.stat().st_mtime_ns for p in exported.eval_dir.iterdir()} if before else {}
    silent = Silent() if case == "timeout" else None
    args = {"unreachable": ["--served", f"http://127.0.0.1:{free_port()}"],
            "unknown model": ["--served", server, "--model", "no-such-model"],
            "not openai": ["--served", not_openai],
            "timeout": ["--served", f"http://127.0.0.1:{silent.port if silent else 0}", "--timeout", "2"]}[case]
    result = run_ft("eval", str(exported.root), *args, *FEW)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "error:" in result.stderr
    expected = {"unreachable": "cannot reach", "unknown model": "has no model 'no-such-model'",
                "not openai": "not an OpenAI-compatible server", "timeout": "did not answer within 2 s"}[case]
    assert expected in result.stderr, result.stderr
    if case == "unknown model":
        assert "support" in result.stderr  # the names it does have
    after = {p.name: p.stat().st_mtime_ns for p in exported.eval_dir.iterdir()} if before else {}
    assert after == stamp  # nothing in eval/ written or touched
