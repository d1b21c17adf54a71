"""Model loading: a base model and its tokenizer, as every stage sees them.

One room for what train, eval, chat and export's verification all need to agree on: which
weights and template a recipe means (`prepare`), the 4-bit settings (`quantization_config`),
loading at the compute dtype with bitsandbytes' 4-bit layers kept differentiable
(`load_base_model`), and the model's skeleton on the meta device (`skeleton`). `ft eval` loads
the base exactly as training did, so base and fine-tune are compared at the precision the
adapters were trained against. LoRA itself is training's (finetune/train/lora.py); which base a
trained run used is its adapter folder's to say (finetune/adapter.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune import data as data_mod
from finetune import render
from finetune.bases import ResolvedBase, resolve_base
from finetune.distributed import shards, world
from finetune.errors import UserError
from finetune.models import Family
from finetune.preflight import available_ram
from finetune.recipe import Recipe


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


def native_bf16_cpu() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles); elsewhere torch emulates it,
    slower than fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_bf16(recipe: Recipe) -> bool:
    """train.cpu_bf16 decided: bf16 autocast for a CPU run's matmuls (never on a GPU, which computes
    in bf16 throughout)."""
    if on_gpu():
        return False
    choice = recipe.train.cpu_bf16
    return native_bf16_cpu() if choice == "auto" else choice


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
    if not gpu and recipe.quantization.load_in_4bit:
        from finetune import dequantized

        keep = keep_dequantized_copies(recipe, dequantized.copies_bytes(model, 4), available_ram())
        dequantized.use_ft_forward(model, keep_copies=keep)
        if keep:
            from finetune.lm_head import keep_head_copy

            keep_head_copy(model)
    return model


def keep_dequantized_copies(recipe: Recipe, fp32_copies_bytes: int, available: int | None) -> bool:
    """quantization.cpu_dequantized_copies decided (finetune/dequantized.py): never on a GPU, whose
    fused 4-bit kernels need none; auto keeps them when their fp32 size fits in half the available
    RAM (bf16 autocast keeps half that; the rest is the model, its activations and the system's).
    Never under FSDP or DeepSpeed: each rank would keep the whole unsharded weight."""
    if on_gpu() or not recipe.quantization.load_in_4bit or shards(recipe):
        return False
    choice = recipe.quantization.cpu_dequantized_copies
    if choice != "auto":
        return choice
    return available is not None and fp32_copies_bytes <= available / 2


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


def lora_targets(recipe: Recipe, family: Family) -> list[str]:
    return list(family.lora_targets if recipe.lora.targets == "auto" else recipe.lora.targets)
