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
    return {f"{p}.{f.stem}": f for p in PACKAGES for f in sorted((ROOT / p).glob("*.py"))}


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
