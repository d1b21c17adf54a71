"""Data: formats, column mapping, splits, leakage, and the labels the model is trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune import data
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


@pytest.mark.parametrize("family,twin", [(QWEN3_5, "qwen_twin"), (OLMO3, "olmo_twin")])
def test_labels_cover_assistant_text_and_end_of_turn_only(family, twin, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(twin))
    kwargs = {"enable_thinking": False} if family is QWEN3_5 else {}
    row = data.tokenize(tokenizer, data.Example(CONVERSATION, "t"), family.read_template(training=True), 4096, kwargs)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    labelled = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i] for i in labelled)
    # contiguous spans of labels = the two assistant turns
    spans, start = [], None
    for i in range(len(ids) + 1):
        on = i < len(ids) and labels[i] != -100
        if on and start is None:
            start = i
        if not on and start is not None:
            spans.append((start, i))
            start = None
    texts = [tokenizer.decode(ids[a:b]) for a, b in spans]
    eot = family.end_of_turn
    if family is QWEN3_5:
        assert texts == ['{"category": "billing"}<|im_end|>', '{"category": "bug-report"}<|im_end|>']
    else:  # OLMo 3 Instruct closes the last assistant turn with EOS
        assert texts == ['{"category": "billing"}<|im_end|>', '{"category": "bug-report"}<|endoftext|>']
    for a, b in spans:
        assert tokenizer.convert_ids_to_tokens(ids[b - 1]) in eot  # the stop token is learned
    # nothing of the prompt is labelled: every -100 position decodes to non-assistant text
    unlabelled = tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == -100])
    assert "Sort tickets." in unlabelled and "billing" not in unlabelled


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
    template, kw = QWEN3_5.read_template(training=True), {"enable_thinking": False}
    long_prompt = data.Example([{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}], "f:1")
    long_answer = data.Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 200}], "f:2")
    short = data.Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "f:3")
    with pytest.raises(UserError, match="longer than data.max_length") as info:
        data.tokenize_all(tokenizer, [short, long_prompt], template, 64, kw, "error")
    assert "f:1" in info.value.render()
    ds, report = data.tokenize_all(tokenizer, [long_prompt, long_answer, short], template, 64, kw, "truncate")
    # the long prompt leaves nothing to learn and is dropped; the long answer is cut and kept
    assert report["truncated"] == 2 and report["dropped"] == 1 and report["truncated_where"] == ["f:1", "f:2"]
    assert len(ds) == 2 and max(len(x) for x in ds["input_ids"]) <= 64
    ds, report = data.tokenize_all(tokenizer, [long_prompt, long_answer, short], template, 64, kw, "drop")
    assert len(ds) == 1 and report["dropped"] == 2
