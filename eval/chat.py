"""`ft chat RUN [--gguf]`: talk to the fine-tune in a terminal, as it will be served.

The prompt is the family's served template (what Ollama's TEMPLATE and the GGUF reproduce) with the
trained mode and the recipe's system prompt; decoding is greedy, like `ft eval`; tokens are printed
as they are generated. Two engines: transformers with the adapter on the 4-bit base (the model
`ft eval` scores as "fine-tuned"), or the exported GGUF through llama.cpp (the shipped file).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

Stream = Callable[[str], None]


class TransformersEngine:
    def __init__(self, run, recipe, prep):
        from peft import PeftModel

        from finetune.loading import load_base_model

        self.tokenizer = prep.tokenizer
        self.model = PeftModel.from_pretrained(load_base_model(recipe, prep.base), str(run.adapter)).eval()

    def tokens(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        import torch

        ids = torch.tensor([prompt_ids], device=self.model.device)
        past = None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                yield token
                if token in stop_ids:
                    return
                ids = torch.tensor([[token]], device=self.model.device)


@dataclass
class Chat:
    """One conversation: the messages so far, rendered with the served template on every turn."""

    engine: object
    renderer: object  # finetune.render.Renderer: the served template with the trained switches
    tokenizer: object
    stop_ids: set[int]
    max_new_tokens: int
    system_prompt: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def reply(self, text: str, stream: Stream) -> str:
        """Answer `text`, streaming the answer's text as it is decoded; returns the answer."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.renderer.served_prompt_ids(self.messages)
            answer: list[int] = []
            shown = ""
            for token in self.engine.tokens(prompt, self.max_new_tokens, self.stop_ids):
                if token in self.stop_ids:
                    break
                answer.append(token)
                decoded = self.tokenizer.decode(answer)
                if not decoded.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                    stream(decoded[len(shown):])
                    shown = decoded
            text_out = self.tokenizer.decode(answer)
            stream(text_out[len(shown):])
        except KeyboardInterrupt:  # an unfinished turn is not kept: the conversation is as before it
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": text_out})
        return text_out


def open_chat(run, gguf: bool, max_new_tokens: int | None, system_prompt: bool = True) -> Chat:
    """`system_prompt=False`: no system message, as `ft eval`'s general prompts are sent (the
    template's own default system text, where it has one, still applies)."""
    from finetune.recipe import load_recipe
    from finetune.adapter import base_of_run
    from finetune.loading import prepare

    recipe = load_recipe(run.recipe)
    prep = prepare(recipe, base_of_run(run))
    budget = max_new_tokens or recipe.eval.max_new_tokens
    if gguf:
        from eval.runner import shipped_gguf
        from export.llama import GGUFModel

        engine = GGUFModel(shipped_gguf(run, recipe), recipe.export.num_ctx)  # its tokens() streams
    else:
        engine = TransformersEngine(run, recipe, prep)
    stop_ids = {prep.tokenizer.convert_tokens_to_ids(t) for t in prep.base.family.end_of_turn}
    system = trained_system_prompt(recipe, prep.splits) if system_prompt else None
    return Chat(engine, prep.renderer, prep.tokenizer, stop_ids, budget, system)


def trained_system_prompt(recipe, splits) -> str | None:
    """The recipe's data.system_prompt; else the system message every training example shares
    (a chat file often carries its own), so the chat asks the model what training taught it."""
    if recipe.data.system_prompt:
        return recipe.data.system_prompt
    systems = {e.messages[0]["content"] if e.messages[0]["role"] == "system" else None for e in splits.train}
    return systems.pop() if len(systems) == 1 else None


def read_line(prompt: str) -> str:
    """input(), except that Ctrl-C pressed right as the prompt appears still quits. CPython's input()
    looks at a received signal only when the blocking read() it interrupts returns, so a SIGINT
    that lands between printing the prompt and entering read() would wait for the next Enter.
    Polling stdin brings the interpreter back every 0.2 s to notice it."""
    import select

    sys.stdout.write(prompt)
    sys.stdout.flush()
    while not select.select([sys.stdin], [], [], 0.2)[0]:
        pass
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def interactive(chat: Chat, read: Callable[[str], str] = read_line, write: Stream | None = None) -> None:
    """you> prompts until /exit, Ctrl-D or Ctrl-C at the prompt; /reset starts a new conversation.
    Ctrl-C while the model answers stops that answer and returns to the prompt, as `ollama run`
    does (a long or rambling answer should not cost the conversation)."""
    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write = write or out
    write("chat with the fine-tune: /reset starts over, /exit quits, Ctrl-C stops an answer\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            write("(conversation reset)\n")
            continue
        if not command:
            continue
        write("model> ")
        try:
            chat.reply(line, write)
        except KeyboardInterrupt:
            write("\n(answer stopped; it is not kept in the conversation)")
        write("\n")
