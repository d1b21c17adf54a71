"""`ft chat`: the answer a user gets in the terminal is the answer `ft eval` scored, for the
fine-tune in transformers and for the shipped GGUF; the interactive mode is driven through a real
pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import shutil
import signal
import sys

import pytest

from export.runner import export_run
from finetune.run import RunDir
from tests.conftest import ROOT, run_ft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(qwen_run, tmp_path_factory):
    """The shared trained run, exported and evaluated with the GGUF column."""
    run = RunDir(tmp_path_factory.mktemp("chat") / "run")
    shutil.copytree(qwen_run.root, run.root, ignore=shutil.ignore_patterns("export", "eval", "checkpoints"))
    export_run(run, "q4_k_m", verify=False, progress=lambda m: None)
    result = run_ft("eval", str(run.root), "--gguf", "--set", "eval.max_examples=2", "--set", "eval.max_new_tokens=24")
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.mark.parametrize("column,flags", [("fine-tuned", []), ("gguf", ["--gguf"])])
def test_one_shot_answer_is_what_eval_scored(evaluated, column, flags):
    item = json.loads((evaluated.eval_dir / "predictions.jsonl").read_text().splitlines()[0])
    system, user = item["prompt"][0], item["prompt"][-1]
    assert system["role"] == "system" and len(item["prompt"]) == 2  # chat adds the trained system prompt
    result = run_ft("chat", str(evaluated.root), *flags, "--prompt", user["content"], "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == item["outputs"][column]["text"].strip()
    assert "Traceback" not in result.stderr and "warn" not in result.stderr.lower()


def test_interactive_session_streams_resets_and_exits(evaluated):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "finetune", "chat", str(evaluated.root), "--max-new-tokens", "16"],
                          cwd=str(ROOT), encoding="utf-8", timeout=120)
    child.expect_exact("you> ")
    child.sendline("My invoice is wrong, I was charged twice.")
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    first = child.before.strip()
    assert first, "no answer was printed"
    child.sendline("And the app crashes too.")
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.expect_exact("you> ")
    child.sendline("My invoice is wrong, I was charged twice.")
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    assert child.before.strip() == first  # after /reset the conversation starts over: same answer
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_not_the_chat(evaluated):
    """Ctrl-C while the model answers ends that answer and the chat goes on as if the question was
    never asked; Ctrl-C at the prompt quits (exit 0). The interrupt during an answer is raised where
    a terminal's would land, while a token is printed: on these twins an answer takes milliseconds,
    so a real SIGINT could not be timed into it reliably. At the prompt it is a real one (pty)."""
    from eval.chat import interactive, open_chat

    question = "My invoice is wrong, I was charged twice."
    chat = open_chat(evaluated, gguf=False, max_new_tokens=16)
    expected = chat.reply(question, lambda text: None)
    chat.reset()

    inputs = [question, question]
    printed: list[str] = []
    answers = 0

    def read(prompt: str) -> str:
        printed.append(prompt)
        if not inputs:
            raise KeyboardInterrupt  # Ctrl-C at the prompt
        return inputs.pop(0)

    interrupted = False

    def write(text: str) -> None:
        nonlocal answers, interrupted
        printed.append(text)
        if text == "model> ":
            answers += 1
        elif answers == 1 and text.strip() and not interrupted:
            interrupted = True
            raise KeyboardInterrupt  # the first answer's first token

    interactive(chat, read, write)
    transcript = "".join(printed)
    assert "(answer stopped; it is not kept in the conversation)" in transcript
    assert transcript.split("model> ")[2].split("you> ")[0].strip() == expected.strip()
    assert [m["role"] for m in chat.messages if m["role"] != "system"] == ["user", "assistant"]

    pexpect = pytest.importorskip("pexpect")
    # a shell without job control starts background jobs with SIGINT ignored, and an ignored signal
    # stays ignored across exec: reset it, or the test depends on how pytest was started
    child = pexpect.spawn(sys.executable, ["-m", "finetune", "chat", str(evaluated.root), "--max-new-tokens", "8"],
                          cwd=str(ROOT), encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("you> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
