"""ft's forward for every frozen 4-bit layer on a CPU: the dequantized copy kept while RAM allows,
and under bf16 autocast the bf16 product handed back as it comes.

bitsandbytes' CPU path for a 4-bit linear layer (0.50: `_gemm_4bit_default_impl`, and
`MatMul4Bit.backward`) dequantizes the whole weight to the input's dtype and calls
`torch.nn.functional.linear`; the weight never changes (it is frozen), so the same numbers are
computed on every call: on the demo that is 9% of a greedy-decoding step, and keeping them trains
1.06× faster (bench/RESULTS.md 16). `DequantizedLinear4bit` computes them once and keeps them
(loading.keep_dequantized_copies decides, preflight counts them; where they do not fit it calls
bitsandbytes' own matmul, which dequantizes per call and keeps nothing for the backward). The
layer stays a bitsandbytes Linear4bit (its 4-bit weight, quantization state, state dict and
peft's wrapping are untouched: what the adapter is trained against and what export merges is the
same 4-bit weight), only its forward differs.

Under CPU bf16 autocast (train.cpu_bf16) `linear` casts its fp32 weight to bf16 on every call;
the copy kept there is that bf16 cast (the same rounding, done once, half the memory). And the
product stays bf16, as nn.Linear's and peft's 16-bit layers hand it back under autocast:
bitsandbytes casts it to the input's fp32, and peft's 4-bit LoRA wrapper then clones and adds in
fp32, copies that were 1.14× of a micro-step at the 0.8B's shape (bench/RESULTS.md 17). Every
CPU 4-bit layer takes this forward, copies kept or not, so a run's numbers never depend on how
much RAM was free. tests/test_dequantized.py checks outputs and input gradients bit for bit
against bitsandbytes' own path (in fp32, and under bf16 autocast before bitsandbytes' cast back).

No library does this: bitsandbytes keeps only the packed weight by design (it exists to save
memory), and its AVX512-BF16 inference kernel has no backward (loading.keep_4bit_layers_differentiable).
It is written here as a forward of a few lines.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module


def copy_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype `linear` will multiply in: autocast's on a CPU where it is on, else the compute dtype."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return compute


class DequantizedLinear4bit(bnb.nn.Linear4bit):
    """A Linear4bit whose forward multiplies by a kept dequantized copy of its frozen weight (or,
    with `_copies` None, by bitsandbytes' own dequantize-per-call matmul). Mirrors
    Linear4bit.forward (0.50.2) on its non-packed path step by step, but for the final cast."""

    _copies: dict | None

    def dequantized(self, compute: torch.dtype) -> torch.Tensor:
        dtype = copy_dtype(compute)
        weight = self.weight
        # a weight replaced (peft's merge re-quantizes into new storage and a new state) invalidates the copy
        stamp = (weight.data.data_ptr(), id(weight.quant_state))
        kept = self._copies.get(dtype)
        if kept is None or kept[0] != stamp:
            # what gemm_4bit computes: dequantized straight to the compute dtype, then (autocast) cast
            full = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(compute)
            kept = (stamp, full.to(dtype).detach())
            self._copies.clear()  # one dtype at a time: training and evaluation each use one
            self._copies[dtype] = kept
        return kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            # the dtype F.linear will multiply in: under CPU autocast a bf16 input (the MLP's down
            # projection's) goes to fp32 and back to bf16 otherwise, two copies and their backwards
            x = x.to(copy_dtype(self.compute_dtype) if self._copies is not None else self.compute_dtype)
        bias = self.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(self.compute_dtype)
        if self._copies is None:
            out = bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.weight.quant_state)
        else:
            out = F.linear(x, self.dequantized(self.compute_dtype or inp_dtype), bias)
        if torch.is_autocast_enabled("cpu"):  # as nn.Linear under autocast: the product in autocast's dtype
            return out.to(torch.get_autocast_dtype("cpu"))
        return out.to(inp_dtype)


def four_bit_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def copies_bytes(model, element_bytes: int) -> int:
    """What the kept copies of every 4-bit layer take, at `element_bytes` an element."""
    return sum(m.in_features * m.out_features for m in four_bit_layers(model)) * element_bytes


def use_ft_forward(model, keep_copies: bool) -> int:
    """Switch every CPU 4-bit layer of `model` to DequantizedLinear4bit, keeping copies (made
    lazily, on first use) or not; returns how many."""
    count = 0
    for module in four_bit_layers(model):
        if module.weight.device.type != "cpu":
            continue
        module.__class__ = DequantizedLinear4bit
        module._copies = {} if keep_copies else None
        count += 1
    return count
