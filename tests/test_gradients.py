"""Gradients through the frozen 4-bit base, checked against a reference, on whatever CPU runs this.

A training run is correct when its gradients equal a reference's, not when its loss goes down:
bitsandbytes 0.50 on AVX512-BF16 CPUs silently dropped every gradient through frozen 4-bit layers
after one eval-mode pass, and a loss-falls test stayed green. Here every LoRA gradient of the real
4-bit twin, after the eval pass `ft train` makes before training, is compared with the same model
whose 4-bit weights are dequantized to fp32 nn.Linear layers (same LoRA weights, same batch).

The repacking is driven on every CPU: bitsandbytes decides it once, when a Linear4bit is built
(`support_avx512bf16_for_cpu = has_avx512bf16()`), and the repacking itself is plain tensor code.
On a CPU without AVX512-BF16 the layers are built as bitsandbytes builds them on one that has it
(`as_on_an_avx512bf16_cpu`), so the eval pass really repacks them unless ft prevents it, and
these tests fail on code that does not. What this cannot exercise there: bitsandbytes' fused
AVX512-BF16 inference kernel itself (registered at import time only on such CPUs); the tests say
so when they run without it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from finetune.recipe import load_recipe
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# fp32 on both sides and the same dequantized values: only summation order differs
RTOL = 1e-4


def packed_path_available() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@contextlib.contextmanager
def as_on_an_avx512bf16_cpu():
    """Linear4bit layers built inside this block carry the flag bitsandbytes gives them on an
    AVX512-BF16 CPU, so their first no-grad eval forward repacks them, as it does there."""
    import bitsandbytes.nn.modules as bnb_modules

    if packed_path_available():
        yield
        return
    real = bnb_modules.has_avx512bf16
    bnb_modules.has_avx512bf16 = lambda: True
    try:
        yield
    finally:
        bnb_modules.has_avx512bf16 = real


def twin_model(recipe_name: str, overrides: list[str]):
    from finetune import render
    from finetune.loading import prepare
    from finetune.train.lora import load_model

    recipe = load_recipe(ROOT / "recipes" / recipe_name, ["lora.dropout=0", "data.limit=16", *overrides])
    prep = prepare(recipe)
    with as_on_an_avx512bf16_cpu():
        model = load_model(recipe, prep, "hf", checkpointing=False)
    ds, _ = render.tokenize_all(prep.renderer, prep.splits.train[:4], recipe.data.max_length, "error")
    width = max(len(x) for x in ds["input_ids"])
    pad = prep.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ds["input_ids"]]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in ds["labels"]]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ds["input_ids"]]),
    }
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # non-zero B, so every A has a gradient too
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return model, batch


def dequantized_copy(model):
    """The same model with every bitsandbytes Linear4bit replaced by an fp32 nn.Linear holding
    bitsandbytes' own dequantization of its weights."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, linear)
    return reference


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("copies", [False, True], ids=["per-call", "kept-copies"])
@pytest.mark.parametrize("recipe_name,overrides", [
    ("tiny-support.yaml", []),
    ("tiny-support.yaml", ["model.base=tiny-olmo3"]),
])
def test_lora_gradients_equal_a_dequantized_reference_after_an_eval_pass(recipe_name, overrides, copies):
    """Both CPU paths of ft's 4-bit forward (finetune/dequantized.py): bitsandbytes' dequantize-every-call,
    and the kept copies."""
    import bitsandbytes as bnb

    from finetune.dequantized import DequantizedLinear4bit

    model, batch = twin_model(recipe_name, [*overrides, f"quantization.cpu_dequantized_copies={str(copies).lower()}"])
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the twin must be trained through real 4-bit layers"
    assert all(isinstance(m, DequantizedLinear4bit) and (m._copies is not None) == copies for m in four_bit)
    reference = dequantized_copy(model)  # taken before the eval pass: the untouched 4-bit weights

    model.eval()  # what `ft train` does first: the held-out loss before training
    with torch.no_grad():
        model(**batch)
    packed = [m for m in four_bit if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]

    got, expected = lora_gradients(model, batch), lora_gradients(reference, batch)
    assert got.keys() == expected.keys() and len(got) > 0
    wrong = {}
    for name, g in got.items():
        e = expected[name]
        assert e.norm() > 0, f"{name}: the reference gradient is zero, the comparison would prove nothing"
        if (g - e).norm() > RTOL * e.norm():
            wrong[name] = f"{float((g - e).norm() / e.norm()):.2e}"
    assert not wrong, (f"{len(wrong)} of {len(got)} LoRA gradients differ from the reference (|g - ref| / |ref|; "
                       f"{len(packed)} layers were repacked by the eval pass): {dict(list(wrong.items())[:6])}")
    assert not packed


def test_packed_layout_is_undone_and_gradients_flow():
    """A layer bitsandbytes already repacked (as an eval pass does on AVX512-BF16 CPUs) is
    restored by ft: same outputs as before, and the input gradient equals the reference's."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from finetune.loading import keep_4bit_layers_differentiable

    if not packed_path_available():
        print("no AVX512-BF16 here: the repacking is bitsandbytes' own, its fused inference kernel did not run")
    torch.manual_seed(0)
    with as_on_an_avx512bf16_cpu():
        layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(256, 256) * 0.05})
    layer = layer.to("cpu")  # quantizes
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(8, 256)

    layer.eval()
    with torch.no_grad():
        layer(x)  # bitsandbytes repacks here
    assert layer.weight.quant_state.packing_format_for_cpu, "expected bitsandbytes to repack on this CPU"
    broken = x.clone().requires_grad_()
    layer.train()
    layer(broken).sum().backward()
    print(f"bitsandbytes packed layout, input gradient: {broken.grad}")  # None in 0.50: the defect

    wrapper = torch.nn.Sequential(layer)
    assert keep_4bit_layers_differentiable(wrapper) == 1
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # The packing rounds the block scales to bf16, so the restored weights are the original ones
    # to bf16 precision (ft turns the repacking off before the first forward, so never pays this).
    dense = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(dense, before, rtol=1e-2, atol=1e-3)
    fixed = x.clone().requires_grad_()
    out = layer(fixed)
    out.sum().backward()
    reference = x.clone().requires_grad_()
    ref_out = reference @ dense.t()
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed.grad, reference.grad, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # stays off


def test_cpu_bf16_autocast_stays_within_bf16_of_the_fp32_path():
    """train.cpu_bf16: the Trainer's CPU autocast runs the matmuls in bf16 while weights, adapters
    and the optimizer stay fp32. Against the fp32 path on the same model and batch: the loss
    within 2%, every LoRA gradient pointing the same way (cosine > 0.98) and within 10% of its
    norm (bf16 keeps 8 bits of mantissa). ft's training arguments ask transformers for its CPU
    autocast (bf16 with use_cpu) exactly when it is on. Runs on any CPU (on one without native bf16, emulated and slow, which is why
    auto leaves it off there)."""
    from finetune.distributed import BatchPlan
    from finetune.loading import prepare
    from finetune.models import family_named
    from finetune.run import RunDir
    from finetune.train.trainer import sft_config

    model, batch = twin_model("tiny-support.yaml", [])
    model.train()
    model.zero_grad()
    fp32_loss = model(**batch).loss
    fp32_loss.backward()
    fp32 = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = model(**batch).loss
    bf16_loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            g, e = p.grad.float(), fp32[name]
            cosine = torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0)
            assert p.dtype == torch.float32 and cosine > 0.98 and (g - e).norm() < 0.1 * e.norm(), (name, float(cosine))
    bf16_value, fp32_value = float(bf16_loss.detach()), float(fp32_loss.detach())
    assert abs(bf16_value - fp32_value) < 0.02 * fp32_value and bf16_value != fp32_value  # bf16 really ran

    import tempfile

    plan = BatchPlan(micro_batch=2, grad_accum=1, world_size=1)
    family = family_named(prepare(load_recipe(ROOT / "recipes" / "tiny-support.yaml")).base.family.name)
    with tempfile.TemporaryDirectory() as tmp:
        for choice, autocasts in ((True, True), (False, False)):
            recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", [f"train.cpu_bf16={str(choice).lower()}"])
            args = sft_config(recipe, RunDir(Path(tmp)), plan, family)
            assert args.bf16 is autocasts and args.use_cpu
