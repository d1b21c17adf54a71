"""LoRA on the loaded base: peft's k-bit preparation, the targets checked, the adapters attached.

The training half of model loading (finetune/loading.py keeps what every stage loads the same
way: tokenizer, 4-bit base, the meta-device skeleton). The unsloth backend attaches its own LoRA
(finetune/train/backends.py) with the same targets and settings.
"""

from __future__ import annotations

from finetune.distributed import shards, world
from finetune.errors import UserError
from finetune.loading import Prepared, compute_dtype, load_base_model, lora_targets, quantization_config
from finetune.models import Family
from finetune.recipe import Recipe
from finetune.train.backends import load_unsloth


def load_model(recipe: Recipe, prep: Prepared, backend: str, checkpointing: bool | None = None, dtype=None):
    """The base in 4-bit with fresh LoRA adapters attached; only the adapters are trainable.
    `checkpointing` is preflight's decision; left out, "auto" counts as on."""
    if checkpointing is None:
        checkpointing = recipe.train.gradient_checkpointing is not False
    targets = lora_targets(recipe, prep.base.family)
    if backend == "unsloth":
        dtype = dtype or compute_dtype()
        return load_unsloth(recipe, prep.base.path, targets, quantization_config(recipe, prep.base.family, dtype),
                            dtype, world().local_rank, checkpointing)
    from peft import get_peft_model

    import torch

    dtype = dtype or compute_dtype()
    model = load_base_model(recipe, prep.base, dtype)
    # peft's k-bit preparation upcasts norms and embeddings to fp32, which makes the residual stream
    # fp32: twice the activation memory preflight counts, and not what the published bf16 model,
    # unsloth, TRL's bf16 script or the served GGUF compute. Where compute is bf16 (a GPU) they
    # stay bf16; on a CPU the model is fp32 already.
    prepare_for_training(model, upcast_for_kbit=recipe.quantization.load_in_4bit and not shards(recipe)
                         and dtype == torch.float32, checkpointing=checkpointing, reentrant=shards(recipe))
    check_lora_targets(model, targets, explicit=recipe.lora.targets != "auto")
    from transformers import set_seed

    set_seed(recipe.train.seed)  # the adapters' A matrices are drawn now: seeded, or two runs differ
    return get_peft_model(model, lora_config(recipe, prep.base.family))


def prepare_for_training(model, upcast_for_kbit: bool, checkpointing: bool, reentrant: bool = False) -> None:
    """peft's k-bit preparation (freeze, fp32 norms and embeddings, input grads, checkpointing),
    except under FSDP / DeepSpeed: there the fp32 upcast would give flat parameters two dtypes,
    so (as TRL does for sharded QLoRA) only the input grads and checkpointing are set up, with
    reentrant checkpointing as peft's FSDP-QLoRA guide runs it. Checkpointing is set up here
    once, never again by FSDP (`finetune.distributed` leaves its activation_checkpointing off)."""
    kwargs = {"use_reentrant": reentrant}
    if upcast_for_kbit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                        gradient_checkpointing_kwargs=kwargs)
        return
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()


def check_lora_targets(model, targets: list[str], explicit: bool) -> None:
    """Each entry the recipe names must match layers of this model; the family's `auto` list must
    match at least one (a variant may lack some kinds, e.g. a model of linear-attention layers
    only). peft itself would raise a bare ValueError after the weights are loaded."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing and (explicit or len(missing) == len(targets)):
        raise UserError(f"lora.targets names modules this model does not have: {', '.join(missing)}",
                        "lora.targets", f"use some of this model's linear layers: {', '.join(linear)} (or auto)")


def check_module_settings(recipe: Recipe, family: Family, model) -> None:
    """lora.targets and quantization.skip_modules name modules: checked on the skeleton before the
    run folder is made, and again on the loaded model (a backend may build it differently)."""
    check_lora_targets(model, lora_targets(recipe, family), explicit=recipe.lora.targets != "auto")
    skip = recipe.quantization.skip_modules
    if skip != "auto":
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in skip if m not in names and not any(n.endswith("." + m) for n, _ in model.named_modules())]
        if missing:
            raise UserError(f"quantization.skip_modules names modules this model does not have: {', '.join(missing)}",
                            "quantization.skip_modules", f"use names of its linear layers, e.g. {', '.join(family.skip_4bit)}"
                            " (or auto)")


def lora_config(recipe: Recipe, family: Family):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_targets(recipe, family),
        use_rslora=lora.rslora, use_dora=lora.dora, bias="none", task_type="CAUSAL_LM",
    )


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
