"""llama.cpp through llama-cpp-python: load a GGUF, tokenize, score, generate greedily.

One place for the details: llama.cpp logs to stderr from C (captured into a log file instead),
and a Llama must be closed explicitly (its __del__ at interpreter exit raises otherwise).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def native_log(path: Path | None):
    """Send C-level stderr (llama.cpp's logging) to a file, or to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(str(path) if path else os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


@contextlib.contextmanager
def default_params(getter: str, **fields):
    """`Llama` built inside gets llama.cpp parameters it does not expose: the named defaults
    function of llama-cpp-python (which `Llama` calls at construction) returns them set."""
    import llama_cpp.llama_cpp as capi

    default = getattr(capi, getter)

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    setattr(capi, getter, params)
    try:
        yield
    finally:
        setattr(capi, getter, default)


def server_cpu_kernels():
    """The CPU kernels a llama.cpp server would run here. llama.cpp picks "extra buffer types" by
    CPU (repacked quantized weights, AMX tiles), and their float results differ from the plain
    kernels': on the demo's Q4_K_M file on an AVX512 EPYC, 17 of 60 greedy answers part ways
    (`ft eval --served` against llama-cpp-python's server found it). llama-server, Ollama and
    llama-cpp-python's server keep llama.cpp's choice, so the GGUF column, verification and
    calibration keep it too. One exception: the llama.cpp in llama-cpp-python 0.3.36, built
    natively on a CPU with AMX (Sapphire Rapids and later), segfaults in ggml_backend_amx_mul_mat
    on the first decode of a Q4_K_M file; there the extra buffer types are turned off
    (`use_extra_bufts`)."""
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return contextlib.nullcontext()
    return default_params("llama_model_default_params", use_extra_bufts=False)


# How many prompt tokens llama.cpp evaluates at once decides its float results (its kernels differ
# by batch size), and greedy answers part at near-ties: a 12-step SmolLM2 run's Q4_K_M file answered
# 5 of 16 held-out prompts differently in 64-token pieces than in one piece, as a server evaluates them.
# Answers are generated with the batch a server uses (Ollama's num_batch, llama-server's and
# llama-cpp-python's n_ubatch: 512), so `ft eval --gguf` and `ft chat` answer as a default
# server does. Scores over every position take 64 at a time: llama.cpp keeps an output buffer
# of batch × vocabulary floats, 63 MB for a 248k vocabulary instead of 500 MB.
SERVER_BATCH = 512
SCORING_BATCH = 64


@contextlib.contextmanager
def last_logits_only(llm):
    """Ask llama.cpp for the last position's logits only (a prompt before generation). llama-cpp-
    python takes the choice at construction (`logits_all`) and reads this attribute per batch."""
    constructed, llm._logits_all = llm._logits_all, False
    try:
        yield
    finally:
        llm._logits_all = constructed


class GGUFModel:
    def __init__(self, path: Path, n_ctx: int = 2048, log: Path | None = None, vocab_only: bool = False):
        from llama_cpp import Llama

        self.log = log
        with native_log(log), server_cpu_kernels():
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, SERVER_BATCH), logits_all=True,
                             vocab_only=vocab_only, verbose=False, n_threads=os.cpu_count())
        self.n_ctx = n_ctx

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), n_vocab] logits, position t predicting token t+1."""
        with native_log(self.log):
            self.llm.reset()
            for start in range(0, len(ids), SCORING_BATCH):
                self.llm.eval(ids[start:start + SCORING_BATCH])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokens(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]):
        """Greedy decoding, one token at a time (a stop token is yielded, then nothing more)."""
        from llama_cpp import llama_get_logits_ith

        with native_log(self.log):
            self.llm.reset()
            with last_logits_only(self.llm):  # the prompt in one server-sized batch, one output row
                self.llm.eval(prompt)
            for _ in range(max_new_tokens):
                if self.llm.n_tokens >= self.n_ctx:
                    return
                last = llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated position's row
                token = int(np.argmax(np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),))))
                yield token
                if token in stop_ids:
                    return
                self.llm.eval([token])

    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
        """Greedy decoding; (new tokens, ended with a stop token)."""
        out = list(self.tokens(prompt, max_new_tokens, stop_ids))
        return out, bool(out) and out[-1] in stop_ids
