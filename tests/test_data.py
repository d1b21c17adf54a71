"""Data: formats, column mapping, splits, leakage, and the labels the model is trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune import data, render
from finetune.errors import UserError
from finetune.models import OLMO3, QWEN3_5
from finetune.recipe import DataSection, Recipe


def section(**kw) -> DataSection:
    return DataSection(train="unused", **kw)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- formats ----------------------------------------------------------------------------------

def test_formats_detected_and_mapped(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    inst = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"}])
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}])
    (tmp_path / "d.csv").write_text("text,category\nmy card was charged twice,billing\n", encoding="utf-8")

    ex, fmt = data.load_examples(chat, section(system_prompt="Be brief."))
    assert fmt == "chat" and ex[0].messages[0] == {"role": "system", "content": "Be brief."}
    ex, fmt = data.load_examples(inst, section())
    assert fmt == "instruction" and ex[0].messages[0]["content"] == "Add\n\n1+1"
    ex, fmt = data.load_examples(pc, section())
    assert fmt == "prompt_completion" and [m["content"] for m in ex[0].messages] == ["q", "a"]
    ex, fmt = data.load_examples(str(tmp_path / "d.csv"), section(columns={"prompt": "text", "completion": "category"}))
    assert fmt == "prompt_completion"
    assert ex[0].messages == [{"role": "user", "content": "my card was charged twice"},
                              {"role": "assistant", "content": "billing"}]
    assert ex[0].where.endswith("d.csv:2")


@pytest.mark.parametrize("line,what", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"text": "hello"}', "cannot tell the record format"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    if what.startswith("cannot tell"):
        path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        data.load_examples(str(path), section())
    text = info.value.render()
    assert what in text
    assert f"{path}:{1 if what.startswith('cannot tell') else 2}" in text


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(UserError) as info:
        data.load_examples(str(path), section())
    assert "not UTF-8" in info.value.render() and f"{path}:2" in info.value.render()


# --- splits and leakage -----------------------------------------------------------------------

def test_stratified_split_keeps_every_class(tmp_path):
    rows = [{"prompt": f"ticket {i}", "completion": label}
            for i, label in enumerate(["billing"] * 40 + ["technical"] * 15 + ["rare"] * 3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, _ = data.load_examples(path, section())
    assert {e.label for e in examples} == {"billing", "technical", "rare"}  # auto-detected labels
    train, heldout = data.split(examples, 0.2, seed=1)
    counts = data.label_counts(heldout)
    assert counts == {"billing": 8, "technical": 3, "rare": 1}
    assert len(train) + len(heldout) == len(examples)
    again = data.split(examples, 0.2, seed=1)
    assert [e.key() for e in again[1]] == [e.key() for e in heldout]  # seeded


def test_leaked_examples_removed_and_counted(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", rows[:3] + [{"prompt": "new", "completion": "x"}])
    recipe = Recipe(model={"base": "tiny-qwen3.5"}, data={"train": train, "heldout": heldout}, name="t")
    splits = data.load_splits(recipe)
    assert splits.stats["leaked_removed"] == 3
    assert len(splits.train) == 7 and len(splits.heldout) == 4


def test_heldout_equal_to_train_is_refused(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    recipe = Recipe(model={"base": "tiny-qwen3.5"}, data={"train": path, "heldout": path}, name="t")
    with pytest.raises(UserError, match="also appears in the held-out set"):
        data.load_splits(recipe)


# --- labels -----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Sort tickets."},
    {"role": "user", "content": "My invoice is wrong."},
    {"role": "assistant", "content": '{"category": "billing"}'},
    {"role": "user", "content": "The app crashes on start."},
    {"role": "assistant", "content": '{"category": "bug-report"}'},
]


def renderer_for(family, tokenizer, kwargs) -> render.Renderer:
    return render.Renderer(tokenizer, family.read_template(training=True), family.read_template(), kwargs)


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i in range(len(labels) + 1):
        on = i < len(labels) and labels[i] != -100
        if on and start is None:
            start = i
        if not on and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("family,twin", [(QWEN3_5, "qwen_twin"), (OLMO3, "olmo_twin")])
def test_labels_cover_assistant_text_and_end_of_turn_only(family, twin, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(twin))
    kwargs = {"enable_thinking": False} if family is QWEN3_5 else {}
    rows = renderer_for(family, tokenizer, kwargs).rows(data.Example(CONVERSATION, "t"))
    texts = []
    for row in rows:
        ids, labels = row.input_ids, row.labels
        assert len(ids) == len(labels)
        assert all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != -100)
        for a, b in label_spans(labels):
            texts.append(tokenizer.decode(ids[a:b]))
            assert tokenizer.convert_ids_to_tokens(ids[b - 1]) in family.end_of_turn  # the stop is learned
        # nothing of the prompt is labelled
        unlabelled = tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == -100])
        assert "Sort tickets." in unlabelled and "bug-report" not in unlabelled
    if family is QWEN3_5:
        # Qwen3.5 renders earlier turns without their think block, unlike the prompt the turn was
        # generated from: one row per turn, each ending at its own answer.
        assert len(rows) == 2
        assert texts == ['{"category": "billing"}<|im_end|>', '{"category": "bug-report"}<|im_end|>']
    else:  # OLMo 3's history is what was served: one row; the last turn is closed with EOS
        assert len(rows) == 1
        assert texts == ['{"category": "billing"}<|im_end|>', '{"category": "bug-report"}<|endoftext|>']


THINKING = [
    {"role": "user", "content": "Think first: is 7 prime?"},
    {"role": "assistant", "content": "<think>\n7 has no divisors but 1 and 7.\n</think>\n\nyes"},
    {"role": "user", "content": "And 9?"},
    {"role": "assistant", "content": "no"},
]


@pytest.mark.parametrize("family,kwargs,conversation", [
    (QWEN3_5, {"enable_thinking": False}, CONVERSATION),
    (QWEN3_5, {"enable_thinking": True}, CONVERSATION),
    (QWEN3_5, {"enable_thinking": True}, THINKING),
    (QWEN3_5, {"enable_thinking": True}, CONVERSATION[1:3]),
    (OLMO3, {}, CONVERSATION),
    (OLMO3, {}, CONVERSATION[1:3]),
])
def test_trained_tokens_are_what_follows_the_served_prompt(family, kwargs, conversation, qwen_twin, olmo_twin):
    """For every assistant turn: the tokens before its labels are the served generation prompt,
    tokenized exactly as `ft eval`, the GGUF and Ollama see it, and the labels are the official
    template's continuation of that prompt, up to and including the end-of-turn token."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin if family is QWEN3_5 else olmo_twin)
    renderer = renderer_for(family, tokenizer, kwargs)
    rows = renderer.rows(data.Example(conversation, "t"))
    turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    found = [(row, span) for row in rows for span in label_spans(row.labels)]
    assert len(found) == len(turns)
    for turn, (row, (start, end)) in zip(turns, found):
        prompt = tokenizer.apply_chat_template(conversation[:turn], chat_template=family.read_template(),
                                               add_generation_prompt=True, tokenize=False, **kwargs)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert row.input_ids[:start] == prompt_ids  # token by token, up to the label boundary
        official = tokenizer.apply_chat_template(conversation[:turn + 1], chat_template=family.read_template(),
                                                 tokenize=False, **kwargs)
        assert official.startswith(prompt)
        trained = tokenizer.decode(row.input_ids[start:end])
        continuation = official[len(prompt):]
        eot = tokenizer.convert_ids_to_tokens(row.input_ids[end - 1])
        assert eot in family.end_of_turn
        # the continuation up to its end of turn (OLMo closes a non-final turn with <|im_end|> in
        # history but with EOS when it is the last: either is a trained stop)
        assert trained[:-len(eot)] == continuation[:len(trained) - len(eot)]
        assert continuation[len(trained) - len(eot):].startswith(tuple(family.end_of_turn))
    if family is QWEN3_5 and kwargs["enable_thinking"] and conversation is CONVERSATION:
        # the served prompt opens the think block: closing it is what the model must learn
        assert tokenizer.decode(found[-1][0].input_ids[found[-1][1][0]:]).startswith("\n</think>\n\n{")


def test_reasoning_while_thinking_is_off_is_refused(qwen_twin):
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin)
    renderer = renderer_for(QWEN3_5, tokenizer, {"enable_thinking": False})
    with pytest.raises(UserError, match="model.thinking is false") as info:
        renderer.rows(data.Example(THINKING, "train.jsonl:7"))
    assert "train.jsonl:7" in info.value.render() and "fix:" in info.value.render()


def test_a_custom_template_that_trains_another_prefix_is_refused(qwen_twin):
    """A training template whose text before {% generation %} is not the served prompt would
    train a prefix the model is never given: refused, naming the row."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin)
    wrong = QWEN3_5.read_template(training=True).replace(
        "'\\n<think>\\n\\n</think>\\n\\n' }}", "'\\n' }}", 1)
    assert wrong != QWEN3_5.read_template(training=True)
    renderer = render.Renderer(tokenizer, wrong, QWEN3_5.read_template(), {"enable_thinking": False}, "my.jinja")
    with pytest.raises(UserError, match="different prefix than the served generation prompt") as info:
        renderer.rows(data.Example(CONVERSATION[1:3], "d.jsonl:3"))
    assert "d.jsonl:3" in info.value.render()


@pytest.mark.parametrize("family", [QWEN3_5, OLMO3])
def test_training_template_renders_like_the_official_one(family, qwen_twin, olmo_twin):
    """The {% generation %} markers must change nothing in the text, or training and serving
    (Modelfile, GGUF template) would see different prompts."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin if family is QWEN3_5 else olmo_twin)
    conversations = [
        CONVERSATION,
        CONVERSATION[1:],
        CONVERSATION[:3],
        [{"role": "user", "content": "Think first."},
         {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nanswer"}],
    ]
    for messages in conversations:
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            official = tokenizer.apply_chat_template(messages, chat_template=family.read_template(),
                                                     tokenize=False, **kwargs)
            training = tokenizer.apply_chat_template(messages, chat_template=family.read_template(training=True),
                                                     tokenize=False, **kwargs)
            assert official == training


def test_too_long_examples_error_truncate_or_drop(qwen_twin):
    tokenizer = AutoTokenizer.from_pretrained(qwen_twin)
    renderer = renderer_for(QWEN3_5, tokenizer, {"enable_thinking": False})
    long_prompt = data.Example([{"role": "system", "content": "Rules."}, {"role": "user", "content": "word " * 400},
                                {"role": "assistant", "content": "ok then"}], "f:1")
    long_answer = data.Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 200}], "f:2")
    short = data.Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "f:3")
    with pytest.raises(UserError, match="longer than data.max_length") as info:
        render.tokenize_all(renderer, [short, long_prompt], 64, "error")
    assert "f:1" in info.value.render()
    ds, report = render.tokenize_all(renderer, [long_prompt, long_answer, short], 64, "truncate")
    # the long prompt loses its start and keeps its whole answer; the long answer cannot fit
    assert report["truncated"] == 1 and report["truncated_where"] == ["f:1"]
    assert report["dropped"] == 1 and report["dropped_where"] == ["f:2"]
    assert len(ds) == 2 and max(len(x) for x in ds["input_ids"]) <= 64
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert len(ids) == 64 and tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "ok then<|im_end|>"
    full = renderer.rows(long_prompt)[0]
    assert ids == full.input_ids[-64:]  # the end is kept as it was: the cut is at the prompt's start
    ds, report = render.tokenize_all(renderer, [long_prompt, long_answer, short], 64, "drop")
    assert len(ds) == 1 and report["dropped"] == 2


def test_truncation_keeps_bos_and_unlearns_a_cut_answer():
    row = render.Row([1, 5, 6, 7, 8, 9, 10, 11], [-100, -100, 6, 7, -100, -100, 10, 11], "x")
    cut = render.fit(row, 5, keep_first=1)
    assert cut.input_ids == [1, 8, 9, 10, 11] and cut.labels == [-100, -100, -100, 10, 11]
    cut = render.fit(row, 6, keep_first=None)  # the first answer loses its start: not learned
    assert cut.input_ids == [6, 7, 8, 9, 10, 11] and cut.labels == [-100, -100, -100, -100, 10, 11]
    assert render.fit(row, 1) is None  # the last answer alone is 2 tokens


def test_many_class_split_keeps_the_fraction(tmp_path):
    """50 classes of 4: holding one of each out would be 25%, not the 10% asked for."""
    rows = [{"prompt": f"ticket {c}-{i}", "completion": f"class-{c}"} for c in range(50) for i in range(4)]
    examples, _ = data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows), section(label_column="completion"))
    train, heldout = data.split(examples, 0.1, seed=3)
    assert len(heldout) == 20 and len(train) == 180
    assert max(data.label_counts(heldout).values()) == 1  # spread over 20 classes, not piled on a few


def test_heldout_max_is_a_seeded_sample(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    train = write_jsonl(tmp_path / "t.jsonl", rows[:20])
    heldout = write_jsonl(tmp_path / "h.jsonl", rows[20:])
    recipe = Recipe(model={"base": "tiny-qwen3.5"}, data={"train": train, "heldout": heldout, "heldout_max": 5},
                    name="t")
    picked = [e.where for e in data.load_splits(recipe).heldout]
    assert len(picked) == 5 and picked != [f"{heldout}:{n}" for n in range(1, 6)]  # not the file's head
    assert picked == [e.where for e in data.load_splits(recipe).heldout]  # the same sample each time
    recipe.train.seed = 7
    assert picked != [e.where for e in data.load_splits(recipe).heldout]


# --- ShareGPT and several training files ------------------------------------------------------

SUPPORT = Path(__file__).resolve().parents[1] / "datasets" / "support" / "train.jsonl"
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def support_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in SUPPORT.read_text(encoding="utf-8").splitlines()[:n]]


def as_sharegpt(rows: list[dict], list_key="conversations", role_key="from", content_key="value", names=None):
    names = names or SHAREGPT_NAMES
    return [{list_key: [{role_key: names[m["role"]], content_key: m["content"]} for m in r["messages"]]} for r in rows]


@pytest.mark.parametrize("variant", ["from/value", "role/content", "mapped"])
def test_sharegpt_reads_as_the_same_conversations(tmp_path, variant):
    rows = support_rows(40)
    if variant == "from/value":
        shared, columns = as_sharegpt(rows), {}
    elif variant == "role/content":  # the other common spelling inside `conversations`
        shared = as_sharegpt(rows, role_key="role", content_key="content",
                             names={"system": "system", "user": "user", "assistant": "assistant"})
        columns = {}
    else:
        shared = as_sharegpt(rows, list_key="dialog", role_key="speaker", content_key="text")
        columns = {"conversations": "dialog", "role": "speaker", "content": "text"}
    path = write_jsonl(tmp_path / "sharegpt.jsonl", shared)
    chat, chat_format = data.load_examples(write_jsonl(tmp_path / "chat.jsonl", rows), section())
    got, fmt = data.load_examples(path, section(columns=columns))
    assert (fmt, chat_format) == ("sharegpt", "chat")
    assert [e.messages for e in got] == [e.messages for e in chat]


@pytest.mark.parametrize("speaker,message", [("observation", "tool turn"), ("function_call", "tool turn"),
                                             ("bot", "unknown speaker 'bot'")])
def test_sharegpt_tool_and_unknown_turns_are_refused_naming_the_row(tmp_path, speaker, message):
    rows = as_sharegpt(support_rows(3))
    rows[2]["conversations"].insert(2, {"from": speaker, "value": "{}"})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=message) as info:
        data.load_examples(path, section())
    assert f"{path}:3" in info.value.render() and "fix:" in info.value.render()


def test_several_training_files_with_weights_and_per_source_splits(tmp_path):
    rows = support_rows(100)
    chat = write_jsonl(tmp_path / "chat.jsonl", rows[:60])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", as_sharegpt(rows[60:]))
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)])
    recipe = Recipe(name="t", model={"base": "tiny-qwen3.5"}, data={
        "heldout_fraction": 0.1,
        "train": [chat, {"path": sharegpt, "weight": 2}, {"path": pc, "weight": 0.5, "format": "prompt_completion",
                                                           "columns": {"prompt": "q", "completion": "a"}}]})
    splits = data.load_splits(recipe)
    sources = splits.stats["sources"]
    assert [(s["format"], s["records"], s["heldout"], s["train"]) for s in sources] == [
        ("chat", 60, 6, 54), ("sharegpt", 40, 4, 72), ("prompt_completion", 20, 2, 9)]  # weights: ×2, ×0.5
    assert all(len(s["sha256"]) == 64 for s in sources) and splits.stats["format"] == "chat+prompt_completion+sharegpt"
    assert len(splits.heldout) == 12 and splits.stats["train"] == 54 + 72 + 9
    held = {e.key() for e in splits.heldout}
    assert not any(e.key() in held for e in splits.train)
