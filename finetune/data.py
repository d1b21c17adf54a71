"""Data: files → conversations → training and held-out splits (finetune/render.py turns them into
token ids with assistant-only labels).

Four record shapes are accepted, detected from the first record unless the recipe says:
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  sharegpt           {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
                     (also user/assistant, and role/content keys inside the list)
  instruction        {"instruction": ..., "input": ..., "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}
`data.columns` maps these field names onto a file's own columns (`{prompt: text, completion:
category}`, or `{conversations: dialog, role: speaker, content: text}`), which is how CSV files
are read. `data.train` may list several files, each with its own format, columns and weight.

Splits are seeded; a label column stratifies them; examples of the held-out set are removed from
training (leakage); with several files each is split on its own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import DataSection, Recipe

ROLES = ("system", "user", "assistant")
PARQUET_MAGIC = b"PAR1"  # a Parquet file starts (and ends) with these bytes
FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass
class Example:
    messages: list[dict]
    where: str  # file:line, for every message about this example
    label: str | None = None  # class of the example (stratified split, label metrics)

    def key(self) -> str:
        """Identity for duplicate and leakage checks: the exact conversation."""
        return json.dumps(self.messages, sort_keys=True, ensure_ascii=False)


@dataclass
class Splits:
    train: list[Example]
    heldout: list[Example]
    format: str
    stats: dict = field(default_factory=dict)


# --- reading ----------------------------------------------------------------------------------

def read_records(source: str, data: DataSection) -> list[tuple[dict, str]]:
    """Records with their location ('file:line' or 'hub:name#row')."""
    if source.startswith("hub:"):
        return _read_hub(source[4:], data.hub_split)
    path = Path(source)
    if path.is_dir():
        raise UserError(f"a data file is a folder: {path}", "data", "name the file inside it")
    if not path.is_file():
        raise UserError(f"data file not found: {path}", "data", "check the path (relative to the recipe file)")
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        if f.read(4) == PARQUET_MAGIC and suffix != ".parquet":
            raise UserError(f"this is a Parquet file, named {suffix or 'without a suffix'}", str(path),
                            "rename it to .parquet")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"unsupported data file type '{suffix}'", str(path), "use .jsonl, .json, .csv or .parquet")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError:
        raise UserError(f"no permission to read {path}", str(path), "make the file readable (chmod +r)") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x})", f"{path}:{line}",
                        "re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid JSON: {exc.msg} at column {exc.colno}", f"{path}:{n}",
                            "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError("a line must be a JSON object", f"{path}:{n}", "write one {...} per line")
        rows.append((record, f"{path}:{n}"))
    return rows


def _read_json(path: Path) -> list[tuple[dict, str]]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        fix = ("this looks like JSON Lines: rename it to .jsonl" if exc.msg == "Extra data"
               else "fix the JSON syntax")
        raise UserError(f"invalid JSON: {exc.msg}", f"{path}:{exc.lineno}", fix) from None
    if isinstance(records, dict):
        records = next((v for v in records.values() if isinstance(v, list)), [records])
    if not isinstance(records, list):
        raise UserError(f"the file holds a JSON {type(records).__name__}, not records", str(path),
                        "write a list of objects, [{...}, {...}], or one object per line in a .jsonl file")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"record {i} is a JSON {type(record).__name__}, not an object", f"{path}#{i}",
                            "every record must be an object such as {\"messages\": [...]}")
    return [(r, f"{path}#{i}") for i, r in enumerate(records)]


# A CSV field may hold a whole document; the csv module's default cap (128 KiB) would refuse it.
csv.field_size_limit(2**31 - 1)


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    reader = csv.DictReader(_read_text(path).splitlines())
    try:
        # DictReader counts physical lines; +1 for the header so messages match an editor
        return [(dict(row), f"{path}:{reader.line_num}") for row in reader]
    except csv.Error as exc:
        raise UserError(f"not a readable CSV file: {exc}", f"{path}:{reader.line_num + 1}",
                        "check the quoting of that line, or save the file as CSV again") from None


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:  # ArrowInvalid: not parquet at all, or cut short
        first = path.read_bytes()[:1].decode("latin-1") if path.stat().st_size else ""
        hint = (" (it starts like JSON: name it .jsonl or .json)" if first in "{[" and first else "")
        raise UserError(f"not a Parquet file: {exc}{hint}", str(path),
                        "write it with pandas.DataFrame.to_parquet or datasets' to_parquet, or use .jsonl") from None
    return [(row, f"{path}#{i}") for i, row in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, missing, or private: the user's to fix
        raise UserError(f"cannot load hub dataset '{name}' ({type(exc).__name__})", "data.train",
                        "check the name and your network, or download it to a local file") from None
    return [(row, f"hub:{name}#{i}") for i, row in enumerate(ds)]


# --- records → conversations ------------------------------------------------------------------

def detect_format(record: dict, data: DataSection, where: str) -> str:
    if data.format != "auto":
        return data.format
    present = {f for f in ("messages", "conversations", "instruction", "output", "prompt", "completion")
               if data.columns.get(f, f) in record}
    for fmt, needed in FORMAT_FIELDS.items():
        if all(f in present for f in needed):
            return fmt
    raise UserError(
        f"cannot tell the record format from its fields {sorted(record)[:8]}", where,
        "use fields messages | conversations (ShareGPT) | instruction/input/output | prompt/completion, or map "
        "your columns with data.columns (e.g. {prompt: text, completion: label})",
    )


def to_example(record: dict, fmt: str, data: DataSection, where: str) -> Example:
    def get(name: str, required: bool = True):
        column = data.columns.get(name, name)
        value = record.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise UserError(f"missing or empty field '{column}'", where,
                                f"give every record a non-empty '{column}', or remove the record")
            return None
        return value

    if fmt == "chat":
        messages = get("messages")
        if not isinstance(messages, list):
            raise UserError("'messages' must be a list of {role, content}", where, "see the chat format in README.md")
        messages = [_check_message(m, i, where) for i, m in enumerate(messages)]
    elif fmt == "sharegpt":
        turns = get("conversations")
        if not isinstance(turns, list):
            raise UserError(f"'{data.columns.get('conversations', 'conversations')}' must be a list of turns", where,
                            "see the ShareGPT format in README.md")
        messages = [_check_message(_sharegpt_turn(t, i, data, where), i, where) for i, t in enumerate(turns)]
    elif fmt == "instruction":
        extra = get("input", required=False)
        user = str(get("instruction")) + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(get("output"))}]
    else:
        messages = [{"role": "user", "content": str(get("prompt"))},
                    {"role": "assistant", "content": str(get("completion"))}]
    system = get("system", required=False) if fmt != "chat" else None
    system = system or data.system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(system)})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn to learn from", where,
                        "add an assistant message, or remove the record")
    if messages[-1]["role"] != "assistant":
        raise UserError("the conversation must end with an assistant turn", where,
                        "remove trailing user messages, or add the assistant's answer")
    label = None
    if data.label_column:
        if data.label_column not in record:
            raise UserError(f"label column '{data.label_column}' not in the record", where,
                            f"fix data.label_column; columns here: {', '.join(sorted(record))}")
        label = str(record[data.label_column])
    return Example(messages, where, label)


# ShareGPT speaker names (Axolotl, LLaMA-Factory and unsloth's standardize_sharegpt read the same).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_ROLES = ("function_call", "observation", "tool", "function", "ipython", "tool_call", "tool_response")


def _sharegpt_turn(turn, index: int, data: DataSection, where: str) -> dict:
    """A ShareGPT turn ({from, value}, or {role, content}) as a chat message."""
    if not isinstance(turn, dict):
        raise UserError(f"turn {index} must be an object", where, 'write turns as {"from": ..., "value": ...}')
    role_key = data.columns.get("role") or ("from" if "from" in turn else "role")
    content_key = data.columns.get("content") or ("value" if "value" in turn else "content")
    if role_key not in turn or content_key not in turn:
        raise UserError(f"turn {index} has no '{role_key}' and '{content_key}' keys (it has {sorted(turn)})", where,
                        "name them with data.columns, e.g. {role: speaker, content: text}")
    speaker = turn[role_key]
    if speaker in TOOL_ROLES:
        raise UserError(f"turn {index} is a tool turn ('{speaker}'): ft trains system, user and assistant turns only",
                        where, "remove tool and function turns (or the records with them) from the training file")
    if speaker not in SHAREGPT_ROLES:
        raise UserError(f"turn {index} has unknown speaker '{speaker}'", where,
                        f"use one of: {', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[speaker], "content": turn[content_key]}


def _check_message(message, index: int, where: str) -> dict:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise UserError(f"message {index} must be an object with 'role' and 'content'", where,
                        "write messages as {\"role\": ..., \"content\": ...}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise UserError(f"message {index} has unknown role '{role}'", where, f"use one of: {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise UserError(f"message {index} content must be a string", where, "use plain text content")
    if role == "assistant" and not content.strip():
        raise UserError(f"message {index} is an empty assistant turn", where,
                        "give it the answer the model should learn, or remove the record")
    if role == "system" and index != 0:
        raise UserError(f"message {index}: a system message must come first", where,
                        "move the system message to the start of the conversation")
    return {"role": role, "content": content}


def load_examples(source: str, data: DataSection, limit: int | None = None, seed: int = 0) -> tuple[list[Example], str]:
    records = read_records(source, data)
    if not records:
        raise UserError("the data file has no records", source, "add examples, one per line")
    if limit and limit < len(records):  # a sample, not the head: files are often sorted by class
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), limit))]
    fmt = detect_format(records[0][0], data, records[0][1])
    examples = [to_example(r, fmt, data, w) for r, w in records]
    if not data.label_column and fmt != "chat":
        _auto_label(examples)
    return examples, fmt


# A set of answers is a class label (a CSV `category`, a JSON field's value) when each distinct
# value repeats on average at least LABEL_MIN_REPEATS times (free text almost never repeats
# verbatim; two values always pass, so a yes/no field on a handful of rows counts) and none is
# longer than LABEL_MAX_CHARS (labels are words or short phrases; a sentence repeated verbatim
# is a canned reply, better scored as text). One rule for the data's split and the metrics.
LABEL_MIN_REPEATS = 5
LABEL_MAX_CHARS = 64


def is_categorical(values: list[str]) -> bool:
    """Few distinct, short values: a class label rather than free text."""
    distinct = set(values)
    return (len(distinct) <= max(2, len(values) // LABEL_MIN_REPEATS)
            and max(map(len, distinct), default=0) <= LABEL_MAX_CHARS)


def _auto_label(examples: list[Example]) -> None:
    """A completion that is a class label (is_categorical) stratifies the split and is scored by
    label accuracy."""
    answers = [e.messages[-1]["content"] for e in examples]
    if is_categorical(answers):
        for e, a in zip(examples, answers):
            e.label = a


# --- splits -----------------------------------------------------------------------------------

def load_splits(recipe: Recipe) -> Splits:
    """Training and held-out examples from every source. Without a held-out file each source is
    split on its own (stratified within it), so every source is represented in the held-out set
    in its own proportion; weights apply to the training part only."""
    data = recipe.data
    train, heldout_parts, sources, within = [], [], [], 0
    fmt = None
    for source in data.sources:
        section = data.model_copy(update={"format": source.format, "columns": source.columns})
        examples, fmt = load_examples(source.path, section, data.limit, recipe.train.seed)
        if data.heldout:
            kept, held = examples, []
        else:
            kept, held = split(examples, data.heldout_fraction, recipe.train.seed)
        within += len(kept) - len({e.key() for e in kept})
        used = weighted(kept, source.weight, recipe.train.seed)
        train += used
        heldout_parts += held
        sources.append({"path": source.path, "format": fmt, "weight": source.weight, "records": len(examples),
                        "train": len(used), "heldout": len(held), "sha256": sha256_file(source.path)})
    formats = sorted({s["format"] for s in sources})
    stats: dict = {"format": formats[0] if len(formats) == 1 else "+".join(formats)}
    if len(sources) > 1:
        stats["sources"] = sources
    if data.heldout:
        heldout, _ = load_examples(data.heldout, data)
    else:
        heldout = heldout_parts
    if data.heldout_max and data.heldout_max < len(heldout):  # a seeded sample: files are often sorted
        rng = random.Random(recipe.train.seed)
        heldout = [heldout[i] for i in sorted(rng.sample(range(len(heldout)), data.heldout_max))]
    # Leakage: an example in both sets would make held-out scores measure recall, not skill.
    heldout_keys = {e.key() for e in heldout}
    kept = [e for e in train if e.key() not in heldout_keys]
    stats.update(duplicates_in_train=within, leaked_removed=len(train) - len(kept),
                 train=len(kept), heldout=len(heldout))
    if not kept:
        raise UserError("every training example also appears in the held-out set", data.heldout or "data",
                        "use a held-out file that is separate from the training data")
    if not heldout:
        raise UserError("the held-out set is empty", data.heldout or "data.heldout_fraction",
                        "add held-out examples or raise data.heldout_fraction")
    return Splits(kept, heldout, stats["format"], stats)


def weighted(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """Each example `int(weight)` times, plus a seeded sample for the fractional part."""
    whole, fraction = int(weight), weight - int(weight)
    out = examples * whole
    extra = round(len(examples) * fraction)
    if extra:
        rng = random.Random(seed)
        out += [examples[i] for i in sorted(rng.sample(range(len(examples)), extra))]
    return out


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split holding out round(fraction × N) examples; stratified by label when examples
    have one. Each class gets its proportional share rounded down, and the examples still owed go
    to the classes with the largest remainders (ties broken at random), so a set with many small
    classes keeps the requested fraction instead of forcing one of each class out."""
    rng = random.Random(seed)
    groups: dict[str | None, list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.label].append(e)
    labels = sorted(groups, key=str)
    target = round(len(examples) * fraction)
    shares = {label: len(groups[label]) * fraction for label in labels}
    counts = {label: int(shares[label]) for label in labels}
    tiebreak = {label: rng.random() for label in labels}
    owed = target - sum(counts.values())
    for label in sorted(labels, key=lambda lab: (counts[lab] - shares[lab], tiebreak[lab]))[:owed]:
        counts[label] += 1
    train, heldout = [], []
    for label in labels:
        group = groups[label][:]
        rng.shuffle(group)
        n = min(counts[label], len(group) - 1) if len(group) > 1 else counts[label]
        heldout += group[:n]
        train += group[n:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def label_counts(examples: list[Example]) -> Counter:
    return Counter(e.label for e in examples if e.label is not None)


def sha256_file(path: str) -> str | None:
    if path is None or path.startswith("hub:"):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
