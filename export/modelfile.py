"""The Ollama Modelfile: the GGUF plus the prompt format and stops the model was trained with.

TEMPLATE is Go text/template (Ollama's renderer). Each family's template below reproduces what
its HF chat template renders for system / user / assistant conversations in the mode ft trains
(Qwen3.5 without thinking: every answer after the last user turn opens with an empty think
block), and tests/test_export.py renders both and compares them character for character.
Go templates have no `trim`: Qwen's template trims message contents, this one passes them
through, so contents with leading or trailing whitespace differ (ft's data never has them;
Ollama clients rarely send them).

RENDERER/PARSER is Ollama's built-in alternative for qwen3.5 and olmo3 (`--renderer`); it
thinks by default, so clients must send `"think": false` to get the mode ft trained.

PARAMETERs: ft's evaluation decodes greedily with no penalty. Every Ollama that REQUIRES admits
before 0.32.10 applied `repeat_penalty 1.1` (over the last 64 tokens) to a model whose Modelfile
sets none (api/types.go DefaultOptions), which changes greedy answers: JSON repeats its quotes and
keys. So the Modelfile pins `repeat_penalty 1`. Ollama's other defaults in those releases are
neutral for greedy decoding (presence and frequency penalty 0, min_p 0, typical_p 1, no
mirostat); top_k 40 and top_p only matter when temperature is above 0.
"""

from __future__ import annotations

import re

from finetune.errors import UserError
from finetune.models import OLMO3, SMOLLM2, Family
from finetune.recipe import describe_character, dropped_by_ollama

QWEN35_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ else if eq $m.Role "assistant" }}
{{- $later := false }}{{ range (slice $.Messages $i) }}{{ if eq .Role "user" }}{{ $later = true }}{{ end }}{{ end }}
{{- if $later }}<|im_start|>assistant
{{ $m.Content }}<|im_end|>
{{ else }}<|im_start|>assistant
<think>

</think>

{{ $m.Content }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}<|im_start|>assistant
<think>

</think>

"""

OLMO3_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
""" + OLMO3.default_system + """<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ else if eq $m.Role "assistant" }}<|im_start|>assistant
{{ $m.Content }}{{ if $last }}<|endoftext|>{{ else }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}<|im_start|>assistant
"""

# SmolLM2: ChatML, every turn as is; the checkpoint's default system text when a chat has none.
SMOLLM2_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
""" + SMOLLM2.default_system + """<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""

GO_TEMPLATES = {"qwen3_5": QWEN35_TEMPLATE, "olmo3": OLMO3_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}
# Sampling parameters whose Ollama default changes a greedy answer (see the module docstring).
GREEDY_AS_EVALUATED = {"repeat_penalty": 1}
REQUIRES_LINE_SINCE = "0.14.0"  # older Ollama rejects the REQUIRES command itself
RENDERER_SINCE = {"qwen3.5": "0.17.6", "olmo3": "0.12.4"}


def version_max(*versions: str) -> str:
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def quote(text: str, where: str = "export") -> str:
    """A Modelfile string value. Ollama's grammar has no escapes: a double-quoted value ends at
    the first line break after a closing quote, so a one-line text fits in "...", quotes and all
    (unless it starts with two quotes, which would read as a triple); a triple-quoted value ends
    at the first triple quote followed by whitespace, so any other text fits in one unless it
    holds such a triple. That last case no Modelfile can carry, nor a character Ollama's parser
    drops (it would serve another text than the one written)."""
    dropped = dropped_by_ollama(text)
    if dropped:
        raise UserError(f"this text holds {describe_character(dropped[0][1])}, which Ollama's Modelfile parser drops",
                        where, "remove it (tabs and line breaks are fine)")
    if "\n" not in text and "\r" not in text and not text.startswith('""'):
        return f'"{text}"'
    if not re.search(r'"""\s', text):
        return f'"""{text}"""'
    raise UserError("this text cannot be written into a Modelfile: it spans lines and contains a "
                    "triple quote followed by whitespace", where, "remove the triple quote from it")


def modelfile(gguf_file: str, family: Family, system: str | None, num_ctx: int, temperature: float,
              top_p: float, license_text: str, renderer: bool = False) -> str:
    lines = ["# Generated by ft. Template, stops and parameters match the fine-tune's training.",
             f"FROM ./{gguf_file}"]
    if renderer and family.ollama_renderer:
        lines += [f"RENDERER {family.ollama_renderer}", f"PARSER {family.ollama_renderer}"]
        requires = version_max(REQUIRES_LINE_SINCE, family.ollama_min_version, RENDERER_SINCE[family.ollama_renderer])
    else:
        lines.append(f"TEMPLATE {quote(GO_TEMPLATES[family.name])}")
        requires = version_max(REQUIRES_LINE_SINCE, family.ollama_min_version)
    lines += [f"PARAMETER stop {quote(token)}" for token in family.end_of_turn]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {top_p:g}", f"PARAMETER num_ctx {num_ctx}"]
    lines += [f"PARAMETER {name} {value:g}" for name, value in GREEDY_AS_EVALUATED.items()]
    if system:
        lines.append(f"SYSTEM {quote(system, 'data.system_prompt')}")
    lines.append(f"LICENSE {quote(license_text)}")
    lines.append(f"REQUIRES {requires}")
    return "\n".join(lines) + "\n"


