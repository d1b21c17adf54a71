"""ft's CPU 4-bit forward (finetune/dequantized.py), copies kept or not, against bitsandbytes' own
CPU path: outputs and input gradients bit for bit, in fp32 and under bf16 autocast (where ft hands
back the bf16 product bitsandbytes casts to fp32), for every 4-bit format ft writes. The twin's LoRA gradients with the copies are checked against the fp32
reference in tests/test_gradients.py, with and without them.

What this cannot exercise here: bitsandbytes' GPU kernels (the copies are never kept on a GPU).
"""

from __future__ import annotations

import pytest
import torch


def quantized_layer(quant_type: str, double_quant: bool, bias: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 320, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=double_quant)
    state = {"weight": torch.randn(320, 192) * 0.05}
    if bias:
        state["bias"] = torch.randn(320) * 0.1
    layer.load_state_dict(state)
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = False  # as ft loads every 4-bit layer (loading.keep_4bit_layers_differentiable)
    return layer


def output_and_input_gradient(layer, x: torch.Tensor, autocast: bool):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
        # a loss with a different weight per output, so the gradient is not the same for every row
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("keep", [True, False], ids=["kept-copy", "per-call"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("quant_type,double_quant,bias", [("nf4", True, False), ("nf4", False, True),
                                                          ("fp4", True, True)])
def test_ft_forward_equals_bitsandbytes_bit_for_bit(quant_type, double_quant, bias, autocast, keep):
    """Under autocast the product is handed back in bf16, as nn.Linear does; bitsandbytes casts the
    same bf16 product to fp32, so its values are ours exactly and the input gradients too."""
    from finetune.dequantized import DequantizedLinear4bit, use_ft_forward

    layer = quantized_layer(quant_type, double_quant, bias)
    x = torch.randn(3, 7, 192)
    expected = output_and_input_gradient(layer, x, autocast)
    assert use_ft_forward(torch.nn.Sequential(layer), keep_copies=keep) == 1
    assert isinstance(layer, DequantizedLinear4bit)
    got = output_and_input_gradient(layer, x, autocast)
    assert got[0].dtype == (torch.bfloat16 if autocast else expected[0].dtype)
    assert torch.equal(got[0].to(expected[0].dtype), expected[0]), \
        "forward differs from bitsandbytes' dequantize-and-matmul"
    assert torch.equal(got[1], expected[1]), "input gradient differs from bitsandbytes' backward"
    if keep:
        kept = next(iter(layer._copies.values()))[1]
        assert kept.dtype == (torch.bfloat16 if autocast else torch.float32)  # autocast's cast, done once
        assert not kept.requires_grad
    else:
        assert layer._copies is None


def test_no_grad_inference_equals_bitsandbytes():
    from finetune.dequantized import use_ft_forward

    layer = quantized_layer("nf4", True, False).eval()
    x = torch.randn(5, 192)
    with torch.no_grad():
        expected = layer(x)
        use_ft_forward(torch.nn.Sequential(layer), keep_copies=True)
        assert torch.equal(layer(x), expected)


def test_a_replaced_weight_is_dequantized_again():
    """peft's merge re-quantizes a 4-bit layer's weight into new storage: the old copy must go."""
    from finetune.dequantized import use_ft_forward

    layer = quantized_layer("nf4", True, False)
    use_ft_forward(torch.nn.Sequential(layer), keep_copies=True)
    x = torch.randn(2, 192)
    with torch.no_grad():
        before = layer(x)
        import bitsandbytes as bnb

        layer.weight = bnb.nn.Params4bit(torch.randn(320, 192) * 0.05, requires_grad=False, quant_type="nf4",
                                         module=layer).to("cpu")
        after = layer(x)
        fresh = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert not torch.equal(after, before)
    assert torch.equal(after, torch.nn.functional.linear(x, fresh))


def test_auto_keeps_copies_only_where_they_fit():
    from finetune.loading import keep_dequantized_copies
    from finetune.recipe import load_recipe
    from tests.conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml")
    gib = 1 << 30
    assert keep_dequantized_copies(recipe, 2 * gib, 8 * gib)
    assert not keep_dequantized_copies(recipe, 5 * gib, 8 * gib)  # more than half the available RAM
    assert not keep_dequantized_copies(recipe, 1, None)  # available RAM unknown: bitsandbytes' path
    forced = load_recipe(ROOT / "recipes" / "tiny-support.yaml", ["quantization.cpu_dequantized_copies=true"])
    assert keep_dequantized_copies(forced, 5 * gib, 8 * gib)
    sixteen = load_recipe(ROOT / "recipes" / "tiny-support.yaml", ["quantization.load_in_4bit=false"])
    assert not keep_dequantized_copies(sixteen, 1, 8 * gib)


def test_preflight_counts_the_copies_in_the_matmul_dtype(monkeypatch):
    from finetune import loading
    from finetune.loading import lora_targets, meta_model
    from finetune.models import REGISTRY
    from finetune.preflight import count_parameters, memory_estimate
    from finetune.recipe import load_recipe
    from finetune.sizes import text_config
    from tests.conftest import ROOT

    model = REGISTRY["qwen3.5-0.8b"]
    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", ["model.base=qwen3.5-0.8b"])
    config = text_config(model)
    params, embed, lora = count_parameters(meta_model(config), lora_targets(recipe, model.family), recipe.lora.r)
    without = memory_estimate(recipe, config, params, embed, lora, gpu=False, checkpointing=True)
    for bf16, element in ((False, 4), (True, 2)):
        monkeypatch.setattr(loading, "cpu_bf16", lambda r, bf16=bf16: bf16)
        kept = memory_estimate(recipe, config, params, embed, lora, gpu=False, checkpointing=True, kept_copies=True)
        head = config.vocab_size * config.hidden_size * 2 if bf16 else 0  # the loss head's bf16 copy (lm_head.py)
        assert kept.weights - without.weights == (params - embed) * element + head
    on_gpu = memory_estimate(recipe, config, params, embed, lora, gpu=True, checkpointing=True, kept_copies=True)
    assert on_gpu.weights == memory_estimate(recipe, config, params, embed, lora, gpu=True, checkpointing=True).weights


@pytest.mark.parametrize("keep", [True, False], ids=["kept-copy", "per-call"])
def test_a_bf16_input_under_autocast_equals_bitsandbytes(keep):
    """The MLP's down projection gets a bf16 input under autocast: ft multiplies it as it comes
    (bitsandbytes casts it to fp32 and autocast back to bf16): output and input gradient the same
    bit for bit."""
    from finetune.dequantized import use_ft_forward

    layer = quantized_layer("nf4", True, False)
    x = torch.randn(3, 7, 192).to(torch.bfloat16)
    expected = output_and_input_gradient(layer, x, autocast=True)
    use_ft_forward(torch.nn.Sequential(layer), keep_copies=keep)
    got = output_and_input_gradient(layer, x, autocast=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_lora_inputs_left_in_their_dtype_give_the_same_bits():
    """peft's 4-bit LoRA wrapper, with its input cast to the fp32 adapter's dtype (peft's default
    on a CPU) and without (trainer.lora_inputs_as_they_come, under CPU bf16 autocast): output, input
    gradient and both adapters' gradients bit for bit, for a bf16 input and an fp32 one."""
    from peft import LoraConfig, get_peft_model

    from finetune.dequantized import use_ft_forward
    from finetune.train.trainer import lora_inputs_as_they_come

    model = get_peft_model(torch.nn.Sequential(quantized_layer("nf4", True, False)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    use_ft_forward(model, keep_copies=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.1  # zero at init: nothing would flow through A

    def run(x):
        model.zero_grad(set_to_none=True)
        out, grad = output_and_input_gradient(model, x, autocast=True)
        return [out, grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 7, 192).to(dtype)
        cast = run(x)
        assert lora_inputs_as_they_come(model) == 1
        as_they_come = run(x)
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = True
        assert len(cast) == 4 and all(torch.equal(a, b) for a, b in zip(cast, as_they_come)), dtype
