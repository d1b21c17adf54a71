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


MODEL_BUILDING = ("from_pretrained", "BitsAndBytesConfig", "get_peft_model", "LoraConfig", "prepare_model_for_kbit_training")


def test_model_loading_has_a_room_of_its_own():
    """finetune/loading.py builds the model (4-bit config, loading, peft's preparation, LoRA);
    finetune/train.py runs the trainer. eval, chat and export's verification load models through
    loading and never reach into the training run: only the CLI (and `ft validate`, which runs
    train's own checks without training) imports finetune.train."""
    importers = sorted(name for name, path in modules().items()
                       if "finetune.train" in {t.rsplit(".", 1)[0] if t.startswith("finetune.train.") else t
                                               for t in project_imports(path, top_level_only=False)}
                       and name not in ("finetune.cli", "finetune.train", "finetune.validate"))
    assert not importers, f"import model loading from finetune.loading, not finetune.train: {importers}"
    train_source = (ROOT / "finetune" / "train.py").read_text(encoding="utf-8")
    builds = [word for word in MODEL_BUILDING if word in train_source]
    assert not builds, f"finetune/train.py builds models itself ({builds}): that belongs in finetune/loading.py"
    loading = project_imports(ROOT / "finetune" / "loading.py", top_level_only=False)
    assert not any(t.startswith("finetune.train") for t in loading), "loading must not depend on the training run"
    for name in ("eval.runner", "eval.chat", "export.runner"):
        assert any(t.startswith("finetune.loading") for t in project_imports(modules()[name], top_level_only=False)), name
