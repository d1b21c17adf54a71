"""Model loading: a base model, its tokenizer and its LoRA adapters, as training sees them.

One room for what train, eval, chat and export's verification all need to agree on: which
weights a run's base is (`prepare`, `base_of_run`), the 4-bit settings (`quantization_config`),
loading at the compute dtype and keeping bitsandbytes' 4-bit layers differentiable
(`load_base_model`), peft's k-bit preparation and the LoRA targets and config (`load_model`).
`ft eval` loads the base exactly as training did, so base and fine-tune are compared at the
precision the adapters were trained against. finetune/train.py keeps the run itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune import data as data_mod
from finetune import render
from finetune.backends import load_unsloth
from finetune.bases import ResolvedBase, resolve_base
from finetune.distributed import shards, world
from finetune.errors import UserError
from finetune.models import Family
from finetune.recipe import Recipe
from finetune.run import RunDir


@dataclass
class Prepared:
    """Everything training needs that does not depend on the weights."""

    base: ResolvedBase
    tokenizer: object
    template: str
    template_kwargs: dict
    splits: data_mod.Splits
    renderer: render.Renderer


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def training_template(recipe: Recipe, family: Family) -> tuple[str, str]:
    """(template text, where it came from) used to render and mask training examples."""
    if recipe.model.chat_template is None:
        return family.read_template(training=True), f"finetune/templates/{family.training_template}"
    path = Path(recipe.model.chat_template)
    if not path.is_file():
        raise UserError(f"chat template not found: {path}", "model.chat_template", "check the path")
    return path.read_text(encoding="utf-8"), str(path)


def load_tokenizer(base: ResolvedBase, recipe: Recipe):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path, revision=recipe.model.revision,
                                                  trust_remote_code=recipe.model.trust_remote_code)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of '{base.name}': {type(exc).__name__}: {exc}",
                        "model.base", "check the model folder or hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = base.family.pad_token
    return tokenizer


def check_weights_format(base: ResolvedBase, recipe: Recipe) -> None:
    """Pickle weights can run arbitrary code when loaded: refused unless the recipe opts in."""
    folder = Path(base.path)
    if not folder.is_dir() or recipe.model.allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise UserError(f"the base model's weights are pickle files ({', '.join(pickles[:3])}), which can run "
                        "code when loaded", "model.base",
                        "convert them to safetensors, or set model.allow_pickle: true if you trust their source")


def prepare(recipe: Recipe, base: ResolvedBase | None = None) -> Prepared:
    """Resolve the model, check the template, load and split the data. Fast: no weights.
    `base`: the one a run was trained on (base_of_run), so eval and chat never load another."""
    base = base or resolve_base(recipe.model.base)
    check_weights_format(base, recipe)
    tokenizer = load_tokenizer(base, recipe)
    template, where = training_template(recipe, base.family)
    kwargs = render.template_kwargs(base.family, recipe)
    render.check_template(template, base.family, kwargs, where, tokenizer)
    splits = data_mod.load_splits(recipe)
    renderer = render.Renderer(tokenizer, template, base.family.read_template(), kwargs, where)
    return Prepared(base, tokenizer, template, kwargs, splits, renderer)


def base_of_run(run: RunDir) -> ResolvedBase | None:
    """The base a run was trained on, as its adapter records it. An alias can resolve to other
    weights later (the hub checkpoint once online, the packaged file offline): a run's eval, chat
    and export must use the weights its adapter was trained against."""
    path = run.adapter / "ft_adapter.json"
    if not path.is_file():
        return None
    from finetune.models import FAMILIES

    info = json.loads(path.read_text(encoding="utf-8"))
    family = next(f for f in FAMILIES if f.name == info["family"])
    return ResolvedBase(info["base_model"], info["base_path"], family, info.get("license", ""),
                        info.get("base_weights", "the hub checkpoint"))


def compute_dtype():
    """bf16 on GPU, fp32 on CPU (no fast bf16 matmul on most CPUs)."""
    import torch

    return torch.bfloat16 if on_gpu() else torch.float32


def quantization_config(recipe: Recipe, family: Family, dtype):
    """ft's 4-bit settings, handed to both backends. The storage dtype is the compute dtype (not
    uint8) so FSDP / DeepSpeed can shard 4-bit weights next to 16-bit ones (peft's FSDP-QLoRA
    guide); on a single device it changes nothing but the container's element type."""
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
        llm_int8_skip_modules=list(family.skip_4bit if q.skip_modules == "auto" else q.skip_modules),
    )


def load_base_model(recipe: Recipe, base: ResolvedBase, dtype=None):
    """The base model as training sees it: 4-bit (unless the recipe says not), compute dtype
    bf16 on GPU and fp32 on CPU. `ft eval` loads it the same way, so base and fine-tuned are
    compared at the precision the adapters were trained against. (`dtype`: a test's override.)"""
    from transformers import AutoModelForCausalLM

    gpu, w = on_gpu(), world()
    dtype = dtype or compute_dtype()
    # allow_pickle permits .bin weights; it must not forbid safetensors (None = prefer them when present)
    kwargs = dict(dtype=dtype, revision=recipe.model.revision,
                  use_safetensors=None if recipe.model.allow_pickle else True,
                  trust_remote_code=recipe.model.trust_remote_code,
                  device_map=None if shards(recipe) else {"": w.local_rank if gpu else "cpu"},
                  quantization_config=quantization_config(recipe, base.family, dtype))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    except SafetensorError as exc:  # a weights file cut short (an interrupted copy or download)
        raise UserError(f"the base model's weights cannot be read: {exc}", f"model.base ({base.path})",
                        "copy or download the checkpoint again; every .safetensors file must be complete") from None
    keep_4bit_layers_differentiable(model)
    return model


def keep_4bit_layers_differentiable(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer; returns how many.

    bitsandbytes >= 0.49, on a CPU with AVX512-BF16, rewrites a Linear4bit's weights into a packed
    layout the first time the layer runs in eval mode without grad, and from then on every forward
    (training included) goes through `gemv_4bit`, which has no autograd kernel: no gradient flows
    back through any frozen 4-bit layer, silently. ft evaluates before training, so every step after
    would train on wrong gradients. The switch is the per-module `support_avx512bf16_for_cpu` flag;
    a layer already packed is unpacked with bitsandbytes' own inverse (which keeps the bf16-rounded
    block scales the packing made: ft flips the flag before any forward, so its layers never are).
    Training and evaluation then
    use the same dequantize-and-matmul path, so eval numbers are computed as the model was trained."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
            count += 1
    return count


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

    model = load_base_model(recipe, prep.base, dtype)
    prepare_for_training(model, upcast_for_kbit=recipe.quantization.load_in_4bit and not shards(recipe),
                         checkpointing=checkpointing, reentrant=shards(recipe))
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


@dataclass
class Skeleton:
    """The model built from its config on the meta device: every module and parameter shape, no
    memory and no weights read. What preflight sizes and what settings naming modules are checked
    against, before anything expensive."""

    config: object  # the text model's config (a vision-language checkpoint's text_config)
    model: object


def meta_model(config, trust_remote_code: bool = False):
    """The model of `config` on the meta device. Built under torch.device("meta"), not accelerate's
    init_empty_weights: with transformers 5.24 the latter leaves a tied lm_head untied, which
    counts a 0.8B Qwen3.5's 254 M embedding parameters twice."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def skeleton(recipe: Recipe, base: ResolvedBase) -> Skeleton:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except Exception as exc:  # offline, gated, or misspelled: the user's to fix
        raise UserError(f"cannot read the config of '{base.name}' ({type(exc).__name__})", "model.base",
                        "check the id and your network (HF_TOKEN for gated models), or use a local folder") from None
    text_config = getattr(config, "text_config", None) or config
    return Skeleton(text_config, meta_model(text_config, recipe.model.trust_remote_code))


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


def lora_targets(recipe: Recipe, family: Family) -> list[str]:
    return list(family.lora_targets if recipe.lora.targets == "auto" else recipe.lora.targets)


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

