"""The Modelfile: its TEMPLATE renders, in Go's text/template (Ollama's engine), exactly what the
HF chat template renders; its grammar is Ollama's; its strings survive any system prompt."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer

from export.modelfile import GO_TEMPLATES, OLMO3_DEFAULT_SYSTEM, modelfile, quote
from export.runner import served_template
from finetune.errors import UserError
from finetune.models import OLMO3, QWEN3_5
from tests.conftest import ROOT

CONVERSATIONS = [
    [{"role": "system", "content": "Triage the ticket. Reply with JSON."},
     {"role": "user", "content": "My invoice is wrong."}],
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "First question?"},
     {"role": "assistant", "content": "First answer."},
     {"role": "user", "content": "Second question?"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
     {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "three, with \"quotes\" and {{ braces }}"}],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (.ci/run installs Debian's golang-go)")
    out = tmp_path_factory.mktemp("go") / "render"
    env = {"HOME": str(out.parent), "GOCACHE": str(out.parent / "cache"), "GOPATH": str(out.parent / "gopath"),
           "PATH": "/usr/bin:/bin", "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(out), str(ROOT / "tests" / "go" / "render.go")], check=True,
                   env=env, capture_output=True)

    def render(template: str, messages: list[dict]) -> str:
        result = subprocess.run([str(out)], input=json.dumps({"template": template, "messages": messages}),
                                capture_output=True, text=True, check=True)
        return result.stdout
    return render


@pytest.mark.parametrize("family", [QWEN3_5, OLMO3], ids=lambda f: f.name)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_go_template_renders_like_the_hf_template(go_render, family, index, qwen_twin, olmo_twin):
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin if family is QWEN3_5 else olmo_twin)
    messages = CONVERSATIONS[index]
    kwargs = {"enable_thinking": False} if family is QWEN3_5 else {}
    expected = tokenizer.apply_chat_template(messages, chat_template=family.read_template(), tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    assert go_render(GO_TEMPLATES[family.name], messages) == expected
    if family is OLMO3 and messages[0]["role"] != "system":
        assert OLMO3_DEFAULT_SYSTEM in expected


def test_served_template_pins_the_trained_mode(qwen_twin):
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin)
    messages = CONVERSATIONS[2]
    pinned = served_template(QWEN3_5, {"enable_thinking": False})
    for kwargs in ({}, {"enable_thinking": True}):  # whatever a runtime passes
        assert tokenizer.apply_chat_template(messages, chat_template=pinned, tokenize=False,
                                             add_generation_prompt=True, **kwargs) == \
            tokenizer.apply_chat_template(messages, chat_template=QWEN3_5.read_template(), tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)


# --- grammar ------------------------------------------------------------------------------------

COMMANDS = {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES",
            "RENDERER", "PARSER"}
PARAMETERS = {"stop", "temperature", "top_p", "top_k", "num_ctx", "num_predict", "seed", "min_p",
              "repeat_penalty", "repeat_last_n"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's documented Modelfile grammar: `COMMAND value` per instruction, `#` comments, values
    bare, in "..." (single line) or in triple quotes (may span lines; no escapes in either)."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.index("\n", i) + 1 if "\n" in text[i:] else len(text)
            continue
        match = re.match(r"([A-Za-z]+)[ \t]+", text[i:])
        assert match, f"no command at {text[i:i + 40]!r}"
        name = match.group(1).upper()
        assert name in COMMANDS, name
        i += match.end()
        if name == "PARAMETER":
            key = re.match(r"([a-z_]+)[ \t]+", text[i:])
            assert key and key.group(1) in PARAMETERS, text[i:i + 30]
            i += key.end()
            name = f"PARAMETER {key.group(1)}"
        if text.startswith('"""', i):
            end = re.search(r'"""(?=\s|$)', text[i + 3:])
            assert end, "unterminated triple-quoted value"
            value, i = text[i + 3:i + 3 + end.start()], i + 3 + end.end()
        else:
            line_end = text.find("\n", i)
            line = text[i:] if line_end < 0 else text[i:line_end]
            i = len(text) if line_end < 0 else line_end
            line = line.strip()
            value = line[1:-1] if len(line) >= 2 and line[0] == line[-1] == '"' else line
        commands.append((name, value))
    return commands


TRICKY = ['plain', 'with "quotes" inside', 'ends with a quote"', 'has """ triple quotes inline',
          '"""starts and ends with triples"""', "two\nlines", 'multi\nline with "quotes"\n', "trailing space ",
          "tabs\tinside"]


@pytest.mark.parametrize("system", TRICKY)
def test_modelfile_grammar_and_string_round_trip(system):
    text = modelfile("m-q4_k_m.gguf", QWEN3_5, system, 4096, 0.0, 1.0, "apache-2.0")
    commands = parse_modelfile(text)
    names = [c[0] for c in commands]
    assert names[0] == "FROM" and dict(commands)["FROM"] == "./m-q4_k_m.gguf"
    assert dict(commands)["SYSTEM"] == system
    assert dict(commands)["TEMPLATE"] == GO_TEMPLATES["qwen3_5"]
    assert [v for n, v in commands if n == "PARAMETER stop"] == list(QWEN3_5.end_of_turn)
    assert dict(commands)["REQUIRES"] == "0.17.5"


def test_modelfile_one_stop_per_end_of_turn_and_renderer_option():
    text = modelfile("o.gguf", OLMO3, None, 2048, 0.2, 0.9, "apache-2.0", renderer=True)
    commands = parse_modelfile(text)
    assert [v for n, v in commands if n == "PARAMETER stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert ("RENDERER", "olmo3") in commands and ("PARSER", "olmo3") in commands
    assert "TEMPLATE" not in dict(commands) and "SYSTEM" not in dict(commands)
    assert dict(commands)["REQUIRES"] == "0.14.0"  # the REQUIRES line itself needs 0.14.0
    assert dict(commands)["PARAMETER num_ctx"] == "2048"


def test_uncarriable_text_is_refused():
    with pytest.raises(UserError, match="cannot be written into a Modelfile"):
        quote('line one\nhas """ then space')


def test_ollama_create_says_what_to_run_when_ollama_is_absent(tmp_path, monkeypatch):
    from export.runner import ollama_create

    monkeypatch.setenv("PATH", str(tmp_path))  # no ollama binary on it
    message = ollama_create("support", tmp_path / "Modelfile")
    assert "ollama is not installed" in message
    assert f"ollama create support -f {tmp_path / 'Modelfile'}" in message
