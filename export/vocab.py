"""The tokenizer, written into the GGUF the way llama.cpp reads a byte-level BPE vocabulary.

Tokens are listed for every row of the embedding (rows past the tokenizer's last id become
`[PAD{i}]`, as llama.cpp expects n_vocab == embedding rows). Merges, special-token ids and
add-BOS flags come from gguf-py's SpecialVocab. The pre-tokenizer name tells llama.cpp which split
regex to apply; it is a per-family fact (models.py), checked by the tokenizer-parity step of
verification rather than guessed from a hash.
"""

from __future__ import annotations

from pathlib import Path

import gguf


def add_vocab(writer: gguf.GGUFWriter, tokenizer, tokenizer_dir: Path, pre: str, end_of_turn: str,
              vocab_size: int, chat_template: str) -> None:
    """`pre`: llama.cpp's pre-tokenizer name (llama.cpp's LLAMA_VOCAB_PRE_TYPE names, src/llama-vocab.cpp), e.g. qwen35, dbrx, qwen2, llama-bpe."""
    vocab = tokenizer.get_vocab()  # token → id, added tokens included
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id → AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # ft writes the served template itself (below)
    special.add_to_gguf(writer, quiet=True)
    # Byte-level BPE (Qwen, Dolma2) never adds a BOS; say so rather than rely on llama.cpp's default.
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn))
    writer.add_chat_template(chat_template)
