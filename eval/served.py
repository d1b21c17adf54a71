"""`ft eval --served URL`: the held-out set through the server the application talks to.

The GGUF column proves the file behaves like the evaluated model inside llama.cpp. What reaches
the application also depends on the server: which template it renders, the options it adds, its
stop handling, its version (Ollama changed its default repeat penalty in 0.32.10 and its
template auto-detection across 0.30-0.33). This column asks the running server.

- The API: OpenAI-compatible `POST /v1/chat/completions`. Ollama, llama-server, llama-cpp-python's
  server and vLLM all serve it, so one client covers them; Ollama's native `/api/chat` would add
  nothing the comparison needs (its `/v1` endpoint renders the same Modelfile template).
- Each held-out prompt is sent as the application sends it: the conversation's messages, with the
  job's system prompt as a system message when the recipe has one: the messages the GGUF column
  renders with the shipped template. Greedy: temperature 0, a fixed seed, the run's token budget.
- A clean stop is the server's `finish_reason: "stop"`; "length" is a cut answer.
- Streaming (`stream: true`) gives the time to the first token; the answer's tokens are counted
  with the run's tokenizer (servers disagree on whether and how they report usage while streaming).
- Loss and perplexity need the model's probabilities, which a chat API does not return: they are
  shown as not available, never estimated.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from eval.columns import Generation
from eval.heldout import Item
from finetune.errors import UserError

SEED = 0  # the fixed seed every request carries (greedy decoding should not need it; servers may)


@dataclass
class Timing:
    latency_s: float  # request sent → last byte
    first_token_s: float | None  # request sent → first content chunk (None: nothing streamed)
    tokens: int  # the answer's tokens, by the run's tokenizer


@dataclass
class Speed:
    """What the application sees of the box: requests in flight at once, per-request times, and
    output tokens per second over the whole run."""

    concurrency: int
    requests: int
    wall_s: float
    latency_p50_s: float
    latency_p95_s: float
    first_token_p50_s: float | None
    first_token_p95_s: float | None
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a value some request really took)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def speed_of(timings: list[Timing], concurrency: int, wall_s: float) -> Speed:
    latencies = [t.latency_s for t in timings]
    firsts = [t.first_token_s for t in timings if t.first_token_s is not None]
    return Speed(concurrency, len(timings), wall_s, percentile(latencies, 0.5), percentile(latencies, 0.95),
                 percentile(firsts, 0.5) if firsts else None, percentile(firsts, 0.95) if firsts else None,
                 sum(t.tokens for t in timings))


class ServedColumn:
    """A running OpenAI-compatible server, asked over HTTP."""

    def __init__(self, name: str, url: str, model: str | None, tokenizer, max_new_tokens: int, concurrency: int = 1,
                 timeout_s: float = 300.0, extra_fields: dict | None = None):
        self.name, self.tokenizer = name, tokenizer
        self.extra_fields = dict(extra_fields or {})  # what the application adds to each request
        self.base_url = url.rstrip("/").removesuffix("/v1")
        self.max_new_tokens, self.concurrency, self.timeout_s = max_new_tokens, concurrency, timeout_s
        self.model = self._check(model)
        self.timings: list[Timing] = []
        self.speed: Speed | None = None

    # --- talking to the server ---------------------------------------------------------------

    def _open(self, path: str, body: dict | None = None):
        request = urllib.request.Request(self.base_url + path, method="POST" if body is not None else "GET",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code == 404 and path.endswith("/models"):
                raise UserError(f"{self.base_url} answered 404 for {path}: not an OpenAI-compatible server",
                                "--served", "give the server's base URL (Ollama: http://localhost:11434; "
                                "llama-server: http://localhost:8080)") from None
            if exc.code in (404, 400) and body is not None and "model" in detail.lower():
                raise UserError(f"the server has no model {self.model!r}: {detail}", "--model",
                                f"use one of: {', '.join(self._model_ids())}") from None
            raise UserError(f"{self.base_url}{path} answered HTTP {exc.code}: {detail}", "--served",
                            "check the server's log; is it an OpenAI-compatible endpoint?") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
                raise UserError(f"{self.base_url}{path} did not answer within {self.timeout_s:g} s", "--timeout",
                                "raise --timeout, lower --concurrency, or check that the server is not stuck") from None
            raise UserError(f"cannot reach {self.base_url}: {reason}", "--served",
                            "start the server first (ollama serve; llama-server -m FILE), or check the URL and port") \
                from None

    def _json(self, path: str) -> dict:
        with self._open(path) as response:
            raw = response.read()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{self.base_url}{path} did not answer JSON: {raw[:120]!r}", "--served",
                            "give the base URL of an OpenAI-compatible server") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UserError(f"{self.base_url}{path} is not an OpenAI model list", "--served",
                            "give the base URL of an OpenAI-compatible server")
        return data

    def _model_ids(self) -> list[str]:
        return [str(m["id"]) for m in self._json("/v1/models")["data"] if isinstance(m, dict) and "id" in m]

    def _check(self, model: str | None) -> str:
        """Before any weights load: the server answers, speaks the API, and has the model."""
        ids = self._model_ids()
        if model is None:
            if len(ids) != 1:
                raise UserError(f"the server at {self.base_url} serves {len(ids)} models: {', '.join(ids) or 'none'}",
                                "--model", "name the one to evaluate with --model")
            return ids[0]
        # Ollama lists "support:latest" for "support"
        if model not in ids and f"{model}:latest" not in ids:
            raise UserError(f"the server at {self.base_url} has no model {model!r}", "--model",
                            f"use one of: {', '.join(ids) or '(none listed)'}")
        return model

    def _ask(self, item: Item) -> tuple[Generation, Timing]:
        body = {"model": self.model, "messages": item.messages, "temperature": 0, "seed": SEED,
                "max_tokens": self.max_new_tokens, "stream": True, **self.extra_fields}
        text, finish, first = [], None, None
        start = time.monotonic()
        with self._open("/v1/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    raise UserError(f"the server streamed something that is not JSON: {payload[:120]!r}",
                                    "--served", "use an OpenAI-compatible server") from None
                for choice in chunk.get("choices") or []:  # the server's JSON, not a record of ft's
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if first is None:
                            first = time.monotonic() - start
                        text.append(piece)
                    finish = choice.get("finish_reason") or finish
        latency = time.monotonic() - start
        answer = "".join(text)
        tokens = self.tokenizer.encode(answer, add_special_tokens=False) if answer else []
        return (Generation(answer.strip(), finish == "stop", tokens),
                Timing(latency, first, len(tokens)))

    # --- the column ---------------------------------------------------------------------------

    def score(self, items: list[Item]) -> list[tuple[float, int]]:
        """A chat API returns no probabilities: no loss (zero tokens scored reads as n/a)."""
        return [(0.0, 0)] * len(items)

    def generate(self, items: list[Item]) -> list[Generation]:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answered = list(pool.map(self._ask, items))
        self.timings = [t for _, t in answered]
        self.speed = speed_of(self.timings, self.concurrency, time.monotonic() - start)
        return [g for g, _ in answered]


# --- divergence from the shipped file ----------------------------------------------------------

@dataclass
class Divergence:
    differ: int
    total: int
    examples: list[dict] = field(default_factory=list)  # the first few, side by side, with a likely cause


def likely_cause(gguf: Generation, served: Generation, end_of_turn: list[str]) -> str:
    """What most likely made the served answer differ from the file's, from the answers alone."""
    if any(t in served.text for t in end_of_turn) or (gguf.stopped and not served.stopped
                                                     and served.text.startswith(gguf.text)):
        return ("a stop that did not fire: the served answer runs past the end-of-turn token the file stops "
                "at (the server's stop tokens or template)")
    if not gguf.stopped and served.stopped and gguf.text.startswith(served.text):
        return "the server stopped early: a stop sequence the Modelfile does not set, or a smaller budget"
    common = 0
    for a, b in zip(gguf.text, served.text):
        if a != b:
            break
        common += 1
    if common == 0:
        return ("different from the first word: the server rendered another prompt (its template, or a "
                "system message it adds)")
    # ft's GGUF column runs the kernels and the prompt batch a default server runs here (export/llama.py):
    # what numerics remain come from the server's settings or its reuse of the previous request's prefix
    return ("the same start, then apart: a sampling option the server adds (repeat penalty, temperature) "
            "or numerics (llama.cpp's results depend on how many prompt tokens it evaluates at once: a "
            "server batch other than 512, or the prefix a server reuses from the previous request)")


def divergence(items: list[Item], gguf: list[Generation], served: list[Generation], end_of_turn: list[str],
               shown: int = 3) -> Divergence:
    found = Divergence(0, len(items))
    for item, g, s in zip(items, gguf, served):
        if g.text == s.text and g.stopped == s.stopped:
            continue
        found.differ += 1
        if len(found.examples) < shown:
            found.examples.append({"where": item.where, "gguf": g.text, "served": s.text,
                                   "gguf_stopped": g.stopped, "served_stopped": s.stopped,
                                   "likely_cause": likely_cause(g, s, end_of_turn)})
    return found
