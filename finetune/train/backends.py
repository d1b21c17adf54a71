"""Which stack loads the 4-bit base and wraps it in LoRA, and what it really loaded.

hf: transformers + bitsandbytes + peft (CPU or GPU). unsloth (CUDA only): unsloth's loader and
LoRA wrapper, then the same data, trainer and run folder. Both must train the base the recipe
names, at the recipe's revision, with ft's 4-bit settings, because `ft eval` and `ft export`
load exactly that:

- unsloth by default swaps a hub id for its own pre-quantized copy (its `models/mapper.py`: OLMo 3
  → `unsloth/Olmo-3-7B-Instruct-unsloth-bnb-4bit`) and drops the revision with it;
  `use_exact_model_name=True` keeps the recipe's id and revision.
- Qwen3.5 ships as a vision-language checkpoint; `text_only=True` loads the text decoder alone
  (the class `ft eval` loads), so no vision tower sits in GPU memory and adapter keys match.
- ft's BitsAndBytesConfig is handed over as `quantization_config`, which unsloth honours (and may
  extend with its own per-architecture skip list: what was really loaded is recorded).
- Settings unsloth's kernels cannot honour are refused before anything loads: its fast LoRA
  kernels dequantize NF4 with double quantization only, and it has no DoRA path.
- unsloth patches transformers, TRL and peft when imported, so it must be imported before them:
  `pick_backend` runs before anything in `ft train` imports those libraries.

`loaded_facts` reads the loaded model itself (class, source, quantization of every 4-bit layer,
layers kept in 16-bit), the same for both backends, for the manifest and `ft_adapter.json`.
"""

from __future__ import annotations

import inspect

from finetune.distributed import shards
from finetune.errors import UserError
from finetune.recipe import Recipe

UNSLOTH_MIN = "2026.10"  # the first release with text_only and use_exact_model_name honoured for FastModel


def pick_backend(recipe: Recipe) -> str:
    """'hf' or 'unsloth'. Imports unsloth (first, before transformers) only when it may be used.
    `auto` takes unsloth where it runs and can honour the recipe; `unsloth` refuses otherwise."""
    requested = recipe.train.backend
    if requested == "hf":
        return "hf"
    if requested == "unsloth":
        check_unsloth_supports(recipe)
        if shards(recipe):
            raise UserError(f"train.backend 'unsloth' cannot train under distributed.strategy "
                            f"'{recipe.distributed.strategy}': its LoRA kernels need whole 4-bit weights",
                            "train.backend", "set backend: hf (or auto) for fsdp / deepspeed, or use strategy: ddp")
    elif unsloth_cannot_honour(recipe) or shards(recipe):
        # sharded: unsloth turns its fused LoRA kernels off under FSDP only when the launcher says
        # FSDP (ACCELERATE_USE_FSDP, FSDP_VERSION), and its kernels read whole 4-bit weights
        return "hf"
    import torch

    why = "unsloth needs a CUDA GPU"
    if torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401  (patches transformers, TRL and peft: only when asked)

            return "unsloth"
        except Exception as exc:  # not installed, or an install that does not import here
            why = f"unsloth does not import: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    if requested == "unsloth":
        raise UserError(f"train.backend is 'unsloth' but unsloth cannot run here ({why})", "train.backend",
                        "unsloth needs a CUDA GPU and `pip install '.[unsloth]'`; or set backend: hf")
    return "hf"


def auto_fallback(recipe: Recipe, backend: str) -> str | None:
    """Why `backend: auto` trains with hf on a CUDA machine where unsloth would have been chosen,
    when the reason is an unsloth that does not import (installed but broken, or absent): said
    once by ft train and kept in manifest.json, since the run is then slower than the user
    expects. None when nothing fell back, or the fallback is by design (CPU, sharding, settings)."""
    import torch

    if recipe.train.backend != "auto" or backend != "hf" or not torch.cuda.is_available():
        return None
    if unsloth_cannot_honour(recipe) or shards(recipe):
        return None
    try:
        import unsloth  # noqa: F401  (pick_backend tried first: this only reads the same failure)
    except Exception as exc:
        return (f"train.backend auto: trained with hf, not unsloth: unsloth does not import "
                f"({type(exc).__name__}: {exc})").splitlines()[0][:300]
    return None


def unsloth_cannot_honour(recipe: Recipe) -> list[tuple[str, str, str, str]]:
    """(recipe key, its value, why, the setting that works) for each setting unsloth would change."""
    q, problems = recipe.quantization, []
    if q.load_in_4bit and q.quant_type != "nf4":
        problems.append(("quantization.quant_type", f"'{q.quant_type}'", "its LoRA kernels dequantize NF4 only",
                         "quant_type: nf4"))
    if q.load_in_4bit and not q.double_quant:
        problems.append(("quantization.double_quant", "false", "its LoRA kernels expect double-quantized "
                         "block scales", "double_quant: true"))
    if recipe.lora.dora:
        problems.append(("lora.dora", "true", "it has no DoRA path", "dora: false"))
    return problems


def check_unsloth_supports(recipe: Recipe) -> None:
    """Refuse, before loading, what unsloth would silently change."""
    problems = unsloth_cannot_honour(recipe)
    if problems:
        key, value, why, fix = problems[0]
        raise UserError(f"{key} {value} cannot be honoured by the unsloth backend: {why}", key,
                        f"set {fix}, or train.backend: hf (which supports it)")


def check_unsloth_version(from_pretrained) -> None:
    params = inspect.signature(from_pretrained).parameters
    missing = [p for p in ("use_exact_model_name", "text_only") if p not in params]
    if missing:
        raise UserError(f"this unsloth has no {', '.join(missing)} (needed to load exactly the recipe's base)",
                        "train.backend", f"pip install -U 'unsloth>={UNSLOTH_MIN}', or set backend: hf")


def unsloth_load_arguments(recipe: Recipe, base_path: str, quantization_config, compute_dtype, device,
                           checkpointing: bool) -> dict:
    """FastLanguageModel.from_pretrained's arguments: the recipe's base, as ft loads it."""
    q = recipe.quantization
    return dict(
        model_name=base_path, revision=recipe.model.revision,
        use_exact_model_name=True,  # never unsloth's pre-quantized copy of another repository
        text_only=True,  # the text decoder of a vision-language checkpoint (no-op for text models)
        max_seq_length=recipe.data.max_length, dtype=compute_dtype,
        load_in_4bit=q.load_in_4bit, load_in_16bit=not q.load_in_4bit, full_finetuning=False,
        quantization_config=quantization_config,  # ft's settings (None in 16-bit)
        trust_remote_code=recipe.model.trust_remote_code, device_map={"": device},
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=recipe.train.seed, fix_tokenizer=False,  # ft trains with its own tokenizer
    )


def unsloth_lora_arguments(recipe: Recipe, targets: list[str], checkpointing: bool) -> dict:
    lora = recipe.lora
    return dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                use_rslora=lora.rslora, bias="none",
                use_gradient_checkpointing="unsloth" if checkpointing else False,
                random_state=recipe.train.seed)


def load_unsloth(recipe: Recipe, base_path: str, targets: list[str], quantization_config, compute_dtype,
                 device, checkpointing: bool):
    """(pick_backend has already refused the settings unsloth cannot honour.)"""
    from unsloth import FastLanguageModel

    check_unsloth_version(FastLanguageModel.from_pretrained)
    model, _ = FastLanguageModel.from_pretrained(
        **unsloth_load_arguments(recipe, base_path, quantization_config, compute_dtype, device, checkpointing))
    return FastLanguageModel.get_peft_model(model, **unsloth_lora_arguments(recipe, targets, checkpointing))


def loaded_facts(model) -> dict:
    """What is really in memory: class, where it came from, how each layer is stored."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    quant_types, double, kept, four_bit = set(), set(), set(), 0
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            four_bit += 1
            quant_types.add(state.quant_type)
            double.add(bool(state.nested))
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}":  # adapters are not the base
            kept.add(name.rsplit(".", 1)[-1])
    parts = {part for name, _ in base.named_modules() for part in name.split(".")}
    return {
        "class": type(base).__name__,
        "name_or_path": getattr(config, "_name_or_path", None),
        "dtype": str(config.dtype).removeprefix("torch."),
        "linear_4bit": four_bit,
        "quant_type": sorted(quant_types),
        "double_quant": sorted(double),
        "kept_16bit": sorted(kept),
        "vision_tower": bool(parts & {"visual", "vision_tower", "vision_model"}),
    }


def check_loaded(facts: dict, recipe: Recipe, base_path: str, backend: str) -> None:
    """The model in memory is the recipe's: same source, no vision tower, the 4-bit settings asked."""
    q, wrong = recipe.quantization, []
    source = facts["name_or_path"] or base_path
    # a backend may report a local snapshot of the same repository: what must never happen is
    # another repository, such as unsloth's pre-quantized copy
    if source != base_path and ("bnb-4bit" in source or source.startswith("unsloth/")):
        wrong.append(f"loaded {source}, not {base_path}")
    if facts["vision_tower"]:
        wrong.append("a vision tower was loaded (expected the text decoder only)")
    if q.load_in_4bit and facts["quant_type"] != [q.quant_type]:
        wrong.append(f"4-bit layers are {facts['quant_type']}, the recipe asks {q.quant_type}")
    if q.load_in_4bit and facts["double_quant"] != [q.double_quant]:
        wrong.append(f"double quantization {facts['double_quant']}, the recipe asks {q.double_quant}")
    if wrong:
        raise RuntimeError(f"the {backend} backend loaded something other than the recipe's base: " + "; ".join(wrong))
