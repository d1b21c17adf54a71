"""The adapter folder: what `ft train` leaves for every later stage, and the one reader of it.

    runs/<name>/adapter/
      adapter_model.safetensors, adapter_config.json   peft's own files
      tokenizer files                                  the tokenizer as trained (pad token set)
      recipe.yaml                                      the resolved recipe
      chat_template.train.jinja                        the template the masks were computed with
      ft_adapter.json                                  `AdapterInfo`: what the weights were trained on

Like mlx-lm's adapter folder, it describes itself: `ft eval`, `ft chat` and `ft export` need
nothing else to load the same base, render the same template and convert the same architecture.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from finetune.bases import HUB_CHECKPOINT, ResolvedBase
from finetune.errors import UserError
from finetune.models import family_named
from finetune.run import Record, RunDir, write_json

INFO_FILE = "ft_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterInfo(Record):
    """ft_adapter.json. The defaults are what an adapter written before a field existed means."""

    base_model: str  # what the recipe said (an alias, a hub id, a folder)
    base_path: str  # the weights it resolved to when training started
    base_weights: str = HUB_CHECKPOINT  # what those weights are
    family: str
    gguf_arch: str
    end_of_turn: list[str]
    template_kwargs: dict[str, bool] = Field(default_factory=dict)  # the trained mode (thinking on/off)
    lora_targets: list[str]
    quantization: dict[str, Any]
    backend: str
    license: str = ""
    loaded: dict[str, Any] = Field(default_factory=dict)  # what the backend really trained against

    def base(self) -> ResolvedBase:
        """The base a run was trained on. An alias can resolve to other weights later (the hub
        checkpoint once online, the packaged file offline): a run's eval, chat and export must
        use the weights its adapter was trained against."""
        return ResolvedBase(self.base_model, self.base_path, family_named(self.family), self.license,
                            self.base_weights)


def has_adapter(run: RunDir) -> bool:
    return (run.adapter / WEIGHTS_FILE).is_file() and (run.adapter / INFO_FILE).is_file()


def read_adapter_info(run: RunDir) -> AdapterInfo:
    """The run's AdapterInfo; a user error when the run has no complete adapter."""
    if not has_adapter(run):
        raise UserError(f"the run has no complete adapter: {run.adapter}", str(run.root),
                        "train it to the end first (ft train RECIPE, or ft train RECIPE --resume)")
    return AdapterInfo.model_validate_json((run.adapter / INFO_FILE).read_text(encoding="utf-8"))


def base_of_run(run: RunDir) -> ResolvedBase | None:
    """The base the run's adapter was trained on, or None for a run without an adapter yet."""
    return read_adapter_info(run).base() if has_adapter(run) else None


def save_adapter(run: RunDir, info: AdapterInfo, write_weights, tokenizer, recipe_yaml: str, template: str,
                 gathered: Path | None = None) -> None:
    """Write adapter/ under a temporary name and rename it into place when complete.
    `write_weights(folder)`: peft's save_pretrained; `gathered`: a folder the trainer already wrote
    (a sharded adapter, gathered), used instead."""
    tmp = run.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if gathered is not None:
        gathered.rename(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle ft never reads
    else:
        write_weights(tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    (tmp / "chat_template.train.jinja").write_text(template, encoding="utf-8")
    write_json(tmp / INFO_FILE, info.model_dump(mode="json"))
    old = run.root / ".adapter.old"
    shutil.rmtree(old, ignore_errors=True)
    if run.adapter.exists():
        run.adapter.rename(old)
    tmp.rename(run.adapter)
    shutil.rmtree(old, ignore_errors=True)
