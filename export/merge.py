"""LoRA deltas applied to the original 16-bit base, one weight (or one block of rows) at a time.

Training saw an nf4 copy of the base; the shipped model is the *original* weights plus the
adapters' update, computed in fp32: W' = W + s·B·A with s = alpha/r (alpha/√r for rsLoRA).
For DoRA, W' = m / ‖W + s·B·A‖_row · (W + s·B·A), which needs whole rows, and rows are what the
streaming reads in any case. The adapter is small (megabytes) and is held in memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from export.checkpoint import normalize_name
from finetune.errors import Problem, UserError


@dataclass
class Delta:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: [out]

    def apply(self, weight: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        b = self.b if rows is None else self.b[rows]
        merged = weight + self.scale * (b @ self.a)
        if self.magnitude is not None:
            m = self.magnitude if rows is None else self.magnitude[rows]
            merged = (m / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        return merged


class Adapter:
    """The adapter's deltas, keyed by the base weight name they modify (normalized)."""

    def __init__(self, folder: Path):
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise UserError("per-module rank or alpha patterns are not supported by ft export",
                            str(folder / "adapter_config.json"), "train without rank_pattern/alpha_pattern")
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        self.deltas: dict[str, Delta] = {}
        for key in tensors:
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            magnitude = tensors.get(f"{module}.lora_magnitude_vector.weight",
                                    tensors.get(f"{module}.lora_magnitude_vector"))
            weight_name = normalize_name(module.removeprefix("base_model.model.")) + ".weight"
            self.deltas[weight_name] = Delta(
                tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float(), scale,
                magnitude.float() if magnitude is not None else None)
        self.config = config

    def delta_for(self, weight_name: str) -> Delta | None:
        return self.deltas.get(weight_name)

    def check(self, ckpt, folder: Path) -> None:
        """Every delta must land on a base tensor of the shape it was trained against: an adapter
        trained on another base is refused before any work, with every mismatch counted and the
        first eight named (a 9B adapter on the wrong base has hundreds, all alike)."""
        names = ckpt.text_tensors()
        problems = []
        for name, delta in self.deltas.items():
            trained = (delta.b.shape[0], delta.a.shape[1])
            if name not in names:
                problems.append(Problem(f"no base tensor '{name}' for this adapter weight", str(folder)))
            elif tuple(ckpt.shape(names[name])) != trained:
                problems.append(Problem(f"'{name}' is {tuple(ckpt.shape(names[name]))} in the base but the adapter "
                                        f"was trained on {trained}", str(folder)))
        if problems:
            shown = problems[:8]
            if len(problems) > len(shown):
                shown.append(Problem(f"and {len(problems) - len(shown)} more adapter weights like these", str(folder)))
            shown[-1].fix = ("this run was trained on a different base model; export it with the base "
                             "named in its recipe.yaml (model.base)")
            raise UserError(shown)
