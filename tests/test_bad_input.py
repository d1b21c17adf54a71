"""Property test: a valid recipe and dataset, broken in one way at a time by hypothesis, always
give exit 2, one message that names the location, no traceback, and no run folder that looks
complete. Every case runs the real `ft train` entry point (in-process, for speed)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.cli import main
from finetune.recipe import Recipe
from tests.conftest import ROOT

CASES = 300  # hypothesis examples; reported in README.md (Reliability)

SUPPORT = [line for line in (ROOT / "datasets" / "support" / "train.jsonl").read_text().splitlines()]
VALID_KEYS = {name for name in Recipe.model_fields} | {
    k for f in Recipe.model_fields.values() if hasattr(f.annotation, "model_fields") for k in f.annotation.model_fields}


def base_recipe(folder: Path) -> dict:
    return {
        "name": "prop",
        "model": {"base": "tiny-qwen3.5"},
        "data": {"train": str(folder / "train.jsonl"), "heldout": str(folder / "heldout.jsonl"), "max_length": 512},
        "train": {"max_steps": 1, "batch_size": 2},
        "eval": {"after_train": False},
    }


NUMERIC = ["train.lr", "train.batch_size", "lora.r", "data.max_length", "eval.max_new_tokens", "train.epochs"]
IMPOSSIBLE = [("lora.r", 0), ("lora.r", -4), ("train.lr", -0.001), ("train.lr", 5.0), ("data.heldout_fraction", 1.5),
              ("train.batch_size", 0), ("data.max_length", 3), ("lora.dropout", 1.0), ("train.scheduler", "sometimes")]
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12)

recipe_mutation = st.one_of(
    st.tuples(st.just("unknown_key"), st.sampled_from(["", "model", "data", "lora", "train", "eval", "export"]),
              words.filter(lambda w: w not in VALID_KEYS)),
    st.tuples(st.just("wrong_type"), st.sampled_from(NUMERIC),
              st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)),
    st.tuples(st.just("impossible"), st.sampled_from(IMPOSSIBLE), st.none()),
    st.tuples(st.just("missing"), st.sampled_from(["model.base", "data.train", "model"]), st.none()),
    st.tuples(st.just("missing_file"), st.sampled_from(["data.train", "data.heldout"]), words),
    st.tuples(st.just("unknown_model"), words.map(lambda w: "nomodel-" + w), st.none()),
    st.tuples(st.just("bad_yaml"), st.sampled_from(["train: [oops\n", "model:\n\tbase: x\n", "data: {a: b\n"]),
              st.none()),
)
data_mutation = st.tuples(
    st.sampled_from(["invalid_json", "missing_field", "unknown_role", "empty_assistant", "non_utf8", "too_long"]),
    st.integers(min_value=0, max_value=29),
    st.sampled_from(["train", "heldout"]),
) | st.tuples(st.sampled_from(["empty_file", "heldout_equals_train"]), st.just(0), st.just("train"))


def set_key(recipe: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = recipe
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value


def delete_key(recipe: dict, dotted: str) -> None:
    *path, last = dotted.split(".")
    node = recipe
    for p in path:
        node = node[p]
    del node[last]


def mutate_recipe(recipe: dict, mutation, folder: Path) -> tuple[str, str | None]:
    """Applies the mutation; returns (recipe text, what the location must mention)."""
    kind, a, b = mutation
    if kind == "unknown_key":
        (recipe.setdefault(a, {}) if a else recipe)[b] = 1
        return yaml.safe_dump(recipe), f"{a + '.' if a else ''}{b}"
    if kind == "wrong_type":
        set_key(recipe, a, b)
        return yaml.safe_dump(recipe), a
    if kind == "impossible":
        set_key(recipe, *a)
        return yaml.safe_dump(recipe), a[0]
    if kind == "missing":
        delete_key(recipe, a)
        return yaml.safe_dump(recipe), a
    if kind == "missing_file":
        set_key(recipe, a, str(folder / f"{b}.jsonl"))
        return yaml.safe_dump(recipe), f"{b}.jsonl"
    if kind == "unknown_model":
        set_key(recipe, "model.base", a)
        return yaml.safe_dump(recipe), "model.base"
    return yaml.safe_dump(recipe) + a, "r.yaml:"


def mutate_data(folder: Path, recipe: dict, mutation) -> str:
    kind, index, which = mutation
    path = folder / f"{which}.jsonl"
    lines = path.read_text().splitlines()
    index %= len(lines)
    row = json.loads(lines[index])
    if kind == "invalid_json":
        lines[index] = lines[index][: len(lines[index]) // 2]
    elif kind == "missing_field":
        lines[index] = json.dumps({"conversation": row["messages"]})
    elif kind == "unknown_role":
        row["messages"][0]["role"] = "customer"
        lines[index] = json.dumps(row)
    elif kind == "empty_assistant":
        row["messages"][-1]["content"] = "  "
        lines[index] = json.dumps(row)
    elif kind == "too_long":
        row["messages"][0]["content"] = row["messages"][0]["content"] * 60
        lines[index] = json.dumps(row)
    elif kind == "empty_file":
        path.write_text("")
        return f"{path.name}"
    elif kind == "heldout_equals_train":
        recipe["data"]["heldout"] = recipe["data"]["train"]
        return "train.jsonl"
    if kind == "non_utf8":
        raw = [line.encode() for line in lines]
        raw[index] = raw[index][:10] + b"\xff\xfe" + raw[index][10:]
        path.write_bytes(b"\n".join(raw) + b"\n")
    else:
        path.write_text("\n".join(lines) + "\n")
    return f"{path.name}:{index + 1}"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """The real `ft` entry point, in-process: (exit code, stderr)."""
    argv = sys.argv
    sys.argv = ["ft", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


def run_ft_train(recipe_path: Path, out: Path, capsys) -> tuple[int, str]:
    return run_cli(capsys, "train", str(recipe_path), "--output", str(out))


def fresh_folder(tmp_path: Path) -> Path:
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(SUPPORT[:30]) + "\n")
    (folder / "heldout.jsonl").write_text("\n".join(SUPPORT[30:40]) + "\n")
    return folder


def check(code: int, stderr: str, where: str, out: Path) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr  # one message
    assert where in stderr.split("fix:")[0], (where, stderr)
    assert "fix:" in stderr, stderr
    manifest = out / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"


@settings(max_examples=CASES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=st.one_of(recipe_mutation.map(lambda m: ("recipe", m)), data_mutation.map(lambda m: ("data", m))))
def test_every_bad_input_gets_one_clear_message(mutation, tmp_path, capsys, qwen_twin):
    folder = fresh_folder(tmp_path)
    recipe = base_recipe(folder)
    target, change = mutation
    if target == "recipe":
        text, where = mutate_recipe(recipe, change, folder)
    else:
        where = mutate_data(folder, recipe, change)
        text = yaml.safe_dump(recipe)
    recipe_path = folder / "r.yaml"
    recipe_path.write_text(text)
    code, stderr = run_ft_train(recipe_path, folder / "run", capsys)
    check(code, stderr, re.sub(r"^\.", "", where), folder / "run")


# --- the rest of their kind: CLI options, data files, values knowable before training ----------

def int_options():
    """(command, flag, min, max) of every integer option of every command, read from the CLI itself."""
    import inspect
    import typing

    import typer

    from finetune.cli import app

    for command in app.registered_commands:
        name = command.name or command.callback.__name__.rstrip("_")
        hints = typing.get_type_hints(command.callback)
        for param in inspect.signature(command.callback).parameters.values():
            info = param.default
            if not isinstance(info, typer.models.OptionInfo):
                continue
            kinds = {hints[param.name], *typing.get_args(hints[param.name])}
            if int in kinds and bool not in kinds:
                yield name, info.param_decls[0], info.min, info.max


def test_every_integer_option_declares_its_range():
    options = list(int_options())
    assert {("train", "--nproc"), ("validate", "--show"), ("chat", "--max-new-tokens")} <= {o[:2] for o in options}
    assert all(low is not None for *_, low, _ in options), options


@pytest.mark.parametrize("command,flag,low,high", list(int_options()), ids=lambda v: str(v))
def test_an_option_out_of_range_is_a_usage_error(command, flag, low, high, capsys):
    """Below its range, above it, and not a number: exit 2, the option named, no traceback (typer
    >= 0.24 raises its own click's errors, which ft once reported as its own bug)."""
    positional = {"train": [str(ROOT / "recipes" / "tiny-support.yaml")],
                  "validate": [str(ROOT / "recipes" / "tiny-support.yaml")]}.get(command, [])
    values = [str(low - 1), "abc"] + ([str(high + 1)] if high is not None else [])
    for value in values:
        code, stderr = run_cli(capsys, command, *positional, flag, value)
        assert code == 2, (flag, value, stderr)
        assert flag in stderr and "Traceback" not in stderr and "internal error" not in stderr


def test_usage_mistakes_exit_2(capsys):
    for args in ([], ["train"], ["no-such-command"], ["eval", "--gguf=3"], ["train", "r.yaml", "--no-such-flag"]):
        code, stderr = run_cli(capsys, *args)
        assert code == 2 and "Traceback" not in stderr, (args, stderr)


SUPPORT_TEXT = "\n".join(SUPPORT[:30]) + "\n"
NOT_WHAT_THE_NAME_SAYS = {  # file name → (bytes, what the message must say)
    "jsonl-in.parquet": (SUPPORT_TEXT.encode(), "not a Parquet file"),
    "empty.parquet": (b"", "not a Parquet file"),
    "noise.parquet": (bytes(range(256)) * 8, "not a Parquet file"),
    "jsonl-in.json": (SUPPORT_TEXT.encode(), "rename it to .jsonl"),
    "number.json": (b"42", "not records"),
    "text.json": (b'"tickets"', "not records"),
    "scalars.json": (b"[1, 2, 3]", "not an object"),
    "lists.json": (b"[[1, 2]]", "not an object"),
    "noise.csv": (bytes(range(128, 256)) * 4, "not UTF-8"),
    "noise.jsonl": (bytes(range(128, 256)) * 4, "not UTF-8"),
    "arrays.jsonl": (b"[1, 2]\n", "must be a JSON object"),
    "parquet-in.jsonl": (b"parquet", "this is a Parquet file"),  # written by pyarrow below
}


@pytest.mark.parametrize("name", sorted(NOT_WHAT_THE_NAME_SAYS))
def test_a_data_file_that_is_not_what_its_name_says(name, tmp_path, capsys, qwen_twin):
    content, message = NOT_WHAT_THE_NAME_SAYS[name]
    folder = fresh_folder(tmp_path)
    (folder / name).write_bytes(content)
    if content == b"parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in SUPPORT[:30]]), folder / name)
    recipe = base_recipe(folder)
    recipe["data"]["train"] = str(folder / name)
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, stderr = run_cli(capsys, "validate", str(folder / "r.yaml"))
    assert code == 2 and "Traceback" not in stderr, stderr
    assert message in stderr and name in stderr.split("fix:")[0] and "fix:" in stderr, stderr


def test_a_folder_or_a_long_csv_field(tmp_path, capsys, qwen_twin):
    """A folder named like a data file is named as a folder; a CSV field over the csv module's
    128 KiB default (a whole document in a cell) is read, not refused."""
    folder = fresh_folder(tmp_path)
    (folder / "dir.jsonl").mkdir()
    recipe = base_recipe(folder)
    recipe["data"]["train"] = str(folder / "dir.jsonl")
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, stderr = run_cli(capsys, "validate", str(folder / "r.yaml"))
    assert code == 2 and "is a folder" in stderr
    from finetune.data import read_records
    from finetune.recipe import DataSection

    long = folder / "long.csv"
    long.write_text("prompt,completion\n" + "x" * 200_000 + ",billing\n")
    records = read_records(str(long), DataSection(train=str(long)))
    assert len(records[0][0]["prompt"]) == 200_000


KNOWABLE = [  # (override, what the message says): each found before any weights load
    ("eval.require.no_such_metric=0.1", "does not compute: no_such_metric"),
    ("eval.metrics=[rougeL, bleu]", "unknown metric 'bleu'"),
    ("eval.metrics=[json.label.accuracy]", "scores a JSON key no held-out answer has"),
    ("lora.targets=[q_proj, qkv_proj]", "does not have: qkv_proj"),
    ("quantization.skip_modules=[lm_head, embed_out]", "does not have: embed_out"),
    ("train.optimizer=adamw_torh", "did you mean 'adamw_torch'"),
    ("train.optimizer=lomo", "lomo_optim"),
    # checks `ft validate` used to skip (it never tokenized, nor looked at trackers or TRL)
    ("data.max_length=24", "longer than data.max_length (24)"),
    ("train.report_to=[wandb]", "pip install wandb"),
    ("export.candidates=[]", "export.candidates"),
]


@pytest.mark.parametrize("override,message", KNOWABLE, ids=[k[0] for k in KNOWABLE])
def test_values_knowable_before_training_are_refused_before_the_run_folder(override, message, tmp_path, capsys,
                                                                           qwen_twin):
    """`ft train` and `ft validate` refuse with the same exit code and the same message (one list of
    pre-checks, finetune/train/plan.py); the run folder is never made (nothing to clean up)."""
    folder = fresh_folder(tmp_path)
    (folder / "r.yaml").write_text(yaml.safe_dump(base_recipe(folder)))
    out = folder / "run"
    said = []
    for command in (["validate", str(folder / "r.yaml")], ["train", str(folder / "r.yaml"), "--output", str(out)]):
        code, stderr = run_cli(capsys, *command, "--set", override)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert message in stderr and "fix:" in stderr, stderr
        said.append([line for line in stderr.splitlines() if line.startswith(("error:", "  fix:"))])
    assert said[0] == said[1], said
    assert not out.exists()
    if override.startswith("eval.require"):  # the fix lists what will be computed
        assert "json_valid" in stderr and "clean_stop" in stderr
