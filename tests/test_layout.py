"""The house rules the package docstrings state, checked on the source: which stage may import
which, and no import cycles between modules (a cycle is how models.py and twins.py used to be)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("finetune", "export", "eval")


def project_imports(path, top_level_only: bool) -> set[str]:
    """The project modules `path` imports ("finetune.data", "export"), at module level only or
    anywhere (imports inside functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def modules() -> dict[str, object]:
    """Every module of the three packages, subpackages (finetune/train/) included."""
    found = {}
    for package in PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def test_stages_import_one_way():
    """finetune ← export ← eval; the CLI (finetune/cli.py) is the one place that imports them all."""
    allowed = {"finetune": {"finetune"}, "export": {"finetune", "export"}, "eval": {"finetune", "export", "eval"}}
    wrong = []
    for name, path in modules().items():
        if name == "finetune.cli":
            continue
        package = name.split(".")[0]
        wrong += [f"{name} imports {target}" for target in sorted(project_imports(path, top_level_only=False))
                  if target.split(".")[0] not in allowed[package]]
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    known = modules()
    graph = {name: {t for t in project_imports(path, top_level_only=True) if t in known and t != name}
             for name, path in known.items()}

    def cycle_from(start: str, node: str, seen: list[str]) -> list[str] | None:
        for target in sorted(graph[node]):
            if target == start:
                return seen + [target]
            if target not in seen:
                found = cycle_from(start, target, seen + [target])
                if found:
                    return found
        return None

    cycles = [c for name in graph if (c := cycle_from(name, name, [name]))]
    assert not cycles, f"module-level import cycles: {cycles[:3]}"


def test_training_has_a_room_of_its_own():
    """finetune/train/ runs training; finetune/loading.py loads what every stage loads the same way.
    Only the CLI and `ft validate` (which runs train's own checks, finetune/train/plan.py) import
    the training room; loading never depends on it; the room's __init__ stays empty, since
    unsloth must be imported (plan.py) before anything imports transformers."""
    importers = sorted(name for name, path in modules().items()
                       if any(t.startswith("finetune.train") for t in project_imports(path, top_level_only=False))
                       and not name.startswith("finetune.train") and name not in ("finetune.cli", "finetune.validate"))
    assert not importers, f"only the CLI and validate may import the training room: {importers}"
    loading = project_imports(ROOT / "finetune" / "loading.py", top_level_only=False)
    assert not any(t.startswith("finetune.train") for t in loading), "loading must not depend on the training run"
    assert (ROOT / "finetune" / "train" / "__init__.py").read_text() == ""
    for name in ("eval.runner", "eval.chat", "export.runner"):
        assert any(t.startswith("finetune.loading") for t in project_imports(modules()[name], top_level_only=False)), name


# What ft's own files are read back as: each has a typed record whose fields carry the defaults.
RECORD_NAMES = r"\b(manifest|info|adapter_info|report|summary|verify|settings|bounds|imatrix|convert)\b"


def test_ft_reads_its_own_records_through_their_types():
    """No `.get(key, default)` on a file ft wrote (manifest.json, ft_adapter.json, export.json,
    verify.json's bounds, report.json's settings): a default read at the call site is a second
    default, and a renamed field silently reads as missing. Records are finetune.run.Record
    subclasses, read by their owner's reader. metrics.jsonl is a log of differently shaped rows
    (training, evaluation) and is read by `RunDir.read_metrics`/`trained_tokens`."""
    import re

    found = []
    for package in (*PACKAGES, "bench"):
        for f in sorted((ROOT / package).rglob("*.py")):
            source = f.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                    receiver = ast.get_source_segment(source, node.func.value)
                    if re.search(RECORD_NAMES, receiver) or re.search(r"(manifest|ft_adapter|export|verify)\.json",
                                                                      receiver):
                        found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {receiver}.get(...)")
    assert not found, found
