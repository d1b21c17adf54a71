"""Facts of the served side (the GGUF file, llama.cpp, Ollama) that ft must know before anything is
exported: `ft train` and `ft validate` refuse what Ollama would serve otherwise than it was
trained, and preflight sizes the export's files before training is paid for. They live here, not
in export/, because finetune never imports export (finetune ← export ← eval); export reads them
from here too, so each fact has this one home.
"""

from __future__ import annotations

import unicodedata


def dropped_by_ollama(text: str) -> list[tuple[int, str]]:
    """(position, character) of every character Ollama's Modelfile parser silently drops from a
    value: it keeps only runes Go's strconv.IsPrint accepts (letters, marks, numbers, punctuation,
    symbols and the ASCII space), plus tabs and line breaks (ollama parser/parser.go). A system
    prompt holding one (a BEL, a form feed, a no-break or zero-width space) would be served
    otherwise than it was trained; tests/test_modelfile.py checks this against Go itself."""
    return [(i, ch) for i, ch in enumerate(text)
            if ch not in "\t\n\r " and unicodedata.category(ch)[0] not in "LMNPS"]


def describe_character(ch: str) -> str:
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'a control character')})"


# bytes per parameter of each shipped GGUF type (K-quants carry block scales: bits per weight / 8)
# (llama.cpp's quantize table); "auto" holds the best candidate so far and the one being scored
GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.71, "q5_k_s": 0.69,
                        "q4_k_m": 0.61, "q4_k_s": 0.57, "iq4_xs": 0.54, "q3_k_l": 0.54, "q3_k_m": 0.49,
                        "q3_k_s": 0.44, "iq3_m": 0.46, "q2_k": 0.42, "auto": 1.07 + 0.83}
# Held-out conversations ft export verifies logits on. Eight hold a few thousand positions on a
# real model (775 on SmolLM2's demo run), enough to see a wrong conversion (KL
# two orders above a faithful file's) while the reference's logits file stays bounded: one fp32
# row of the vocabulary per position (2.4 GB for a 9B's vocabulary on eight conversations).
VERIFY_PROMPTS = 8


def verify_logits_bytes(max_length: int, vocab: int) -> int:
    """At most: every verified example at max_length, one fp32 logit per vocabulary entry."""
    return VERIFY_PROMPTS * max_length * vocab * 4
