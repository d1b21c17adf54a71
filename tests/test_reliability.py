"""Reliability and safety, proven by doing the damage for real: SIGKILL mid-training and mid-export,
SIGINT, corrupted weights, a full disk, pickles, remote code, and a hub token in the environment."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.run import RunDir
from tests.conftest import ROOT, run_ft

pytestmark = pytest.mark.slow

TINY = ROOT / "recipes" / "tiny-support.yaml"
SMALL = ["data.limit=48", "data.heldout_max=12", "train.batch_size=4", "eval.batch_size=12",
         "train.logging_steps=2", "eval.after_train=false"]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", str(TINY), "--output", str(out), *sum((["--set", s] for s in [*SMALL, *extra]), [])]


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, **(env or {})})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.1) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def kill_point_rng() -> tuple[random.Random, str]:
    """Kill points vary from run to run (each run probes another moment), and are reproducible:
    a failure names its seed, and FT_TEST_SEED=<seed> replays that kill point."""
    seed = int(os.environ.get("FT_TEST_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), f"FT_TEST_SEED={seed}"


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=16", "train.save_steps=4"]
    straight = run_ft(*train_args(tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = json.loads((tmp_path / "straight" / "manifest.json").read_text())["summary"]["heldout_loss_end"]

    out = tmp_path / "killed"
    proc = start(train_args(out, *steps))
    # Killed somewhere after the first checkpoint, at a logged step chosen at random: a step
    # count, not a sleep, so a fast machine cannot finish the run before the kill lands.
    rng, replay = kill_point_rng()
    kill_at = rng.choice([6, 8, 10, 12])
    first = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    wait_for(lambda: first.exists() and any(r.get("step", 0) >= kill_at and "loss" in r
                                            for r in RunDir(out).read_metrics()), proc, poll=0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    # a checkpoint torn on purpose (no trainer state, half a file) must be skipped
    torn = out / "checkpoints" / "checkpoint-999"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\x00" * 100)

    resumed = run_ft(*train_args(out, *steps), "--resume")
    assert resumed.returncode == 0, (resumed.stderr[-2000:], replay)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert "checkpoint-999" not in manifest["resumed_from"]
    got = manifest["summary"]["heldout_loss_end"]
    assert abs(got - expected) / expected < 0.01, (got, expected, f"killed at step {kill_at}", replay)
    steps_logged = [r["step"] for r in RunDir(out).read_metrics() if "loss" in r]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 16
    assert not list((out / "checkpoints").glob("*/training_args.bin"))  # no pickles kept


def test_killed_after_the_last_checkpoint_resumes_without_training_more(tmp_path):
    """Killed during the final eval or adapter save: --resume finishes from the last checkpoint
    (transformers alone would train one step past max_steps)."""
    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "tiny-support.yaml"), "--set", "data.limit=80", "--set",
            "train.max_steps=4", "--set", "train.save_steps=4", "--set", "eval.after_train=false", "--output", str(run)]
    assert run_ft(*args).returncode == 0
    shutil.rmtree(run / "adapter")  # as if killed after checkpoint-4, before the adapter was written
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    resumed = run_ft(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_sharded_run_finished_from_its_last_checkpoint_is_never_prepared_outside_train(tmp_path, monkeypatch):
    """Under FSDP or ZeRO-2 the model may only be prepared inside train(); a run killed after its
    last checkpoint resumes without train() (restore_finished). Here, as under a sharded launch
    (runner.shards true), evaluating or gathering the model there fails the test, as FSDP1 and
    ZeRO-2 fail the run: the resume must neither evaluate nor gather, and rank 0 must save the
    restored adapter, equal to the checkpoint's."""
    from safetensors.torch import load_file

    from finetune.recipe import load_recipe
    from finetune.train import guard, runner

    recipe = load_recipe(TINY, ["data.limit=40", "train.max_steps=2", "train.save_steps=2", "eval.after_train=false"])
    run = RunDir(tmp_path / "run")
    runner.train(recipe, run)
    shutil.rmtree(run.adapter)  # killed after checkpoint-2, before the adapter was written
    manifest = json.loads(run.manifest.read_text())
    run.manifest.write_text(json.dumps({**manifest, "status": "running"}))

    def unprepared(self, *args, **kwargs):
        raise AssertionError("the model was prepared outside train() (FSDP1 / ZeRO-2 fail here)")

    monkeypatch.setattr(runner, "shards", lambda recipe: True)
    monkeypatch.setattr(guard.SafeTrainer, "evaluate", unprepared)
    monkeypatch.setattr(guard.SafeTrainer, "save_model", unprepared)
    summary = runner.train(recipe, run, resume=True)
    assert summary.heldout_loss_end is None and summary.steps == 2
    saved = load_file(str(run.adapter / "adapter_model.safetensors"))
    checkpoint = load_file(str(run.checkpoints / "checkpoint-2" / "adapter_model.safetensors"))
    assert saved.keys() == checkpoint.keys() and all(saved[k].equal(checkpoint[k]) for k in saved)
    assert run.read_manifest().status == "complete"


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start(train_args(out, "train.max_steps=200", "train.save_steps=100"))
    wait_for(lambda: any("loss" in r for r in RunDir(out).read_metrics()), proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "stopped by SIGINT at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved and (saved[-1] / "trainer_state.json").is_file() and not (out / "checkpoints" / ".staging").exists()


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path, qwen_twin):
    """A base with one corrupted (inf) weight: the loss is not finite from the first step."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "corrupted-base"
    shutil.copytree(qwen_twin, base)
    weights = load_file(str(base / "model.safetensors"))
    name = next(n for n in weights if n.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    result = run_ft(*train_args(out, f"model.base={base}", "train.max_steps=8", "train.save_steps=2"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "diverged"
    assert not (out / "adapter").exists()


def test_non_finite_loss_stops_at_the_step_it_happens(tmp_path, qwen_twin):
    """One embedding row set to inf, for a token that only one training example uses: the loss is
    finite until the step that example is trained in. The run must stop at that step, whatever
    logging_steps is and with no checkpoint due (transformers' nan filter hides it from the logs,
    and the weight check only runs at checkpoints)."""
    from collections import Counter

    from safetensors.torch import load_file, save_file

    from finetune import render
    from finetune.recipe import load_recipe
    from finetune.loading import prepare

    recipe = load_recipe(TINY, SMALL)
    prep = prepare(recipe)
    train_rows, _ = render.tokenize_all(prep.renderer, prep.splits.train, recipe.data.max_length, "error")
    heldout_rows, _ = render.tokenize_all(prep.renderer, prep.splits.heldout, recipe.data.max_length, "error")
    in_rows = Counter(t for ids in train_rows["input_ids"] for t in set(ids))
    in_heldout = {t for ids in heldout_rows["input_ids"] for t in ids}
    token = min(t for t, n in in_rows.items() if n == 1 and t not in in_heldout)

    base = tmp_path / "poisoned-base"
    shutil.copytree(qwen_twin, base)
    weights = load_file(str(base / "model.safetensors"))
    name = next(n for n in weights if n.endswith("embed_tokens.weight"))
    weights[name][token] = float("inf")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})

    steps = {}
    for logging in (1, 50):
        out = tmp_path / f"log{logging}"
        result = run_ft(*train_args(out, f"model.base={base}", "train.max_steps=12", "train.save_steps=100",
                                    f"train.logging_steps={logging}"))
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        import re

        found = re.search(r"training diverged: the loss became (\S+) at step (\d+)", result.stderr)
        assert found, result.stderr[-2000:]
        steps[logging] = int(found.group(2))
        assert json.loads((out / "manifest.json").read_text())["status"] == "diverged"
        assert not (out / "adapter").exists()
        if logging == 1:  # every step before it was logged, finite
            losses = {r["step"]: r["loss"] for r in RunDir(out).read_metrics() if "loss" in r}
            assert sorted(losses) == list(range(1, steps[1])), losses
            assert all(v == v and abs(v) != float("inf") for v in losses.values())
    assert steps[1] == steps[50] >= 2, steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run_ft(*train_args(out, "train.max_steps=40", "train.lr=3e-3", "train.save_steps=40",
                                "train.batch_size=8", "data.limit=160", "eval.max_new_tokens=48"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_export_killed_mid_write_leaves_no_final_file(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints"))
    export = run / "export"
    proc = start(["export", str(run)])
    partial = export / ".tiny-support-q4_k_m.gguf.partial"
    wait_for(partial.exists, proc)
    rng, replay = kill_point_rng()
    time.sleep(rng.uniform(0, 1))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = [p.name for p in export.iterdir() if not p.name.startswith(".")]
    assert not [n for n in finals if n.endswith(".gguf")] and "Modelfile" not in finals, (finals, replay)

    again = run_ft("export", str(run))
    assert again.returncode == 0, (again.stderr[-2000:], replay)
    assert json.loads((export / "verify.json").read_text())["passed"]
    assert sorted(p.name for p in export.glob("*.gguf") if p.name != "imatrix.gguf") == ["tiny-support-q4_k_m.gguf"]
    assert not list(export.glob(".*"))


def test_hub_token_never_reaches_any_file(tmp_path):
    secret = "hf_ftTestSecretToken0123456789abcdef"
    run = tmp_path / "run"
    env = {"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret}
    result = run_ft(*train_args(run, "train.max_steps=4", "train.save_steps=2", "eval.after_train=true",
                                "eval.max_examples=4", "eval.max_new_tokens=8"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = run_ft("export", str(run), "--quant", "q8_0", "--no-verify", env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 15
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr + exported.stdout + exported.stderr


def test_pickle_weights_are_refused(tmp_path, qwen_twin):
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "pickled"
    shutil.copytree(qwen_twin, base)
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    result = run_ft("validate", str(TINY), "--set", f"model.base={base}")
    assert result.returncode == 2 and "pickle" in result.stderr and "allow_pickle" in result.stderr


def test_remote_code_is_never_run(tmp_path, qwen_twin):
    """A base of a known architecture whose folder also ships code and names it in `auto_map` for
    the config, the model and the tokenizer (what a hub repo with custom code looks like): ft loads
    the tokenizer, the config, the meta skeleton and the 4-bit weights, trains a step and evaluates,
    and the code never runs. The control: with `model.trust_remote_code: true` the same folder's
    code does run, so the marker is a real tripwire on the paths ft takes."""
    base = tmp_path / "remote"
    shutil.copytree(qwen_twin, base)
    marker = tmp_path / "code-ran"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    remote = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": remote}))
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(
        {**tokenizer_config, "auto_map": {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}}))
    result = run_ft("validate", str(TINY), "--set", f"model.base={base}")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_ft("train", str(TINY), "--output", str(tmp_path / "run"), "--set", f"model.base={base}",
                    "--set", "train.max_steps=1", "--set", "data.limit=16", "--set", "eval.max_examples=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()

    result = run_ft("validate", str(TINY), "--set", f"model.base={base}", "--set", "model.trust_remote_code=true")
    assert marker.exists(), result.stderr[-2000:]


def test_gradient_checkpointing_auto_follows_free_memory(monkeypatch, qwen_twin):
    """auto: off while the estimate without it (811 MiB for the tiny recipe, of which 512 MiB is
    the process) fits in half of the free memory, on when it does not; an explicit setting is kept."""
    from finetune import preflight
    from finetune.bases import resolve_base
    from finetune.loading import skeleton
    from finetune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml")
    base = resolve_base("tiny-qwen3.5")
    targets = ["q_proj"]
    shape = skeleton(recipe, base)
    monkeypatch.setattr(preflight, "available_ram", lambda: 4 << 30)  # a machine with 4 GiB free
    assert preflight.preflight_train(recipe, base, shape, ROOT / "runs" / "x", targets).gradient_checkpointing is False
    monkeypatch.setattr(preflight, "available_ram", lambda: 1 << 30)  # 1 GiB free
    plan = preflight.preflight_train(recipe, base, shape, ROOT / "runs" / "x", targets)
    assert plan.gradient_checkpointing is True and "gradient checkpointing: on (auto)" in plan.lines
    recipe.train.gradient_checkpointing = False
    assert preflight.preflight_train(recipe, base, shape, ROOT / "runs" / "x", targets).gradient_checkpointing is False


def test_preflight_refuses_a_run_that_cannot_fit(tmp_path):
    """On a real 8 MB tmpfs when the machine allows mounting one, else with a stated free-space figure."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    env = {} if mounted else {"FT_ASSUME_FREE_BYTES": str(8 << 20)}
    try:
        result = run_ft(*train_args(small / "run"), env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "preflight" in result.stderr and "GGUF" in result.stderr and "is free" in result.stderr
        assert not (small / "run").exists()  # refused before anything was written
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


def test_a_failed_start_says_so_and_the_fixed_command_just_works(tmp_path, qwen_twin):
    """A user error found only once the run folder exists (here, the base's weights cut short by an
    interrupted copy: safetensors refuses them at load) leaves manifest.json `failed` with the
    message, not `running`; the same command, once the weights are whole, starts the folder over
    without --overwrite. A folder holding a complete checkpoint is still protected."""
    base = tmp_path / "base"
    shutil.copytree(qwen_twin, base)
    weights = base / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "run"
    args = train_args(out, f"model.base={base}", "train.max_steps=2", "train.save_steps=2")

    failed = run_ft(*args)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr and "weights cannot be read" in failed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "weights cannot be read" in manifest["error"]
    assert manifest["process"]["pid"] > 0

    shutil.copy(qwen_twin / "model.safetensors", weights)  # the user fixes the cause
    fixed = run_ft(*args)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "starting" in fixed.stderr and "over: its start failed before any checkpoint was saved" in fixed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["error"] is None and manifest["summary"]["steps"] == 2

    again = run_ft(*args)  # trained checkpoints: protected as before
    assert again.returncode == 2 and "run folder already exists" in again.stderr


def test_a_killed_start_with_no_checkpoint_is_started_over(tmp_path, qwen_twin):
    """A process killed while loading leaves `running` and its pid: once that pid is gone from
    this host and no checkpoint was saved, the folder holds nothing to protect."""
    from finetune.run import left_by_a_failed_start

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.update_manifest(status="running", process={"pid": dead.pid, "host": socket.gethostname()})
    assert "is gone" in left_by_a_failed_start(run)
    run.update_manifest(process={"pid": os.getpid(), "host": socket.gethostname()})
    assert left_by_a_failed_start(run) is None  # alive: another ft may be training into it
    run.update_manifest(status="failed")
    assert "failed before any checkpoint" in left_by_a_failed_start(run)
    (run.checkpoints / "checkpoint-2").mkdir(parents=True)
    (run.checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")  # what makes it complete
    assert left_by_a_failed_start(run) is None
