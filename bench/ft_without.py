"""`ft train` with some of its CPU speed-ups switched off: the baselines the CPU benches compare
ft with, in the same run.

    python -m bench.ft_without SWITCH[,SWITCH...] train RECIPE [ft train's options]

  loss-head       the loss scored by TRL's own LM head, not ft's CpuLogProbs (finetune/lm_head.py);
                  TRL's compact path (labelled positions only) stays on: what is compared is the head
  bf16-hand-back  the 4-bit layers cast their bf16 product back to fp32 under autocast, as
                  bitsandbytes does (finetune/dequantized.py)
  fp32-adapters   the LoRA weights left in bf16, as TRL's SFTTrainer casts them for a quantized
                  model (finetune/train/trainer.keep_adapters_fp32)
  kept-freed      not a switch off but RESULTS 19's allocator, since removed: glibc keeps freed
                  blocks up to 1 GiB on its heap (finetune/allocator.py says why it went)
  delta-rule      transformers' PyTorch delta rule on a CPU's padded batches, at the model's
                  chunk of 64 (finetune/train/linear_attention.py)
  chunk-64        ft's delta rule at the model's chunk of 64, not the one that pads least
                  (linear_attention.cpu_chunk_size)
  conv            transformers' PyTorch causal conv on a CPU's padded batches
  step-sort       each step's rows left in drawn order, not sorted by length across its
                  micro-batches (finetune/train/order.py)
"""

from __future__ import annotations

import sys


def without_loss_head() -> None:
    from finetune import lm_head

    lm_head.fused_head_for_cpu = lambda trl_function: trl_function  # score_only_trained_positions installs this


def without_bf16_hand_back() -> None:
    from finetune.dequantized import DequantizedLinear4bit

    ft_forward = DequantizedLinear4bit.forward
    DequantizedLinear4bit.forward = lambda self, x: ft_forward(self, x).to(x.dtype)


def without_fp32_adapters() -> None:
    from finetune.train import trainer

    trainer.keep_adapters_fp32 = lambda model: 0


def with_kept_freed_blocks() -> None:
    """What ft shipped in RESULTS 19 and dropped in 20: glibc told to serve blocks up to 1 GiB from
    its heap and keep them when freed (padded batches fragment it: 17 GiB over an epoch)."""
    import ctypes

    from finetune.allocator import glibc

    libc, keep = glibc(), ctypes.c_int(1 << 30)
    if libc is not None:
        libc.mallopt(-3, keep)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, keep)  # M_TRIM_THRESHOLD


def without_delta_rule() -> None:
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from finetune.train import packing

    library = qwen.torch_chunk_gated_delta_rule  # as imported, before ft wraps it
    ft_rule = packing.chunk_gated_delta_rule

    def rule(query, key, value, g, beta, segment=None, chunk_size=64, l2norm=True, initial_state=None,
             final_state=None):
        if segment is not None:
            return ft_rule(query, key, value, g, beta, segment, chunk_size, l2norm, initial_state, final_state)
        # at the chunk the model asks for (ft's router has picked its own by now); a shared
        # prefix's state in and out as transformers carries it
        out, state = library(query, key, value, g=g, beta=beta, initial_state=initial_state,
                             output_final_state=final_state is not None, use_qk_l2norm_in_kernel=l2norm)
        if final_state is not None:
            final_state.append(state)
        return out

    packing.chunk_gated_delta_rule = rule


def without_chunk_choice() -> None:
    from finetune.train import packing

    packing.cpu_chunk_size = lambda length, chunk_size=64: chunk_size


def without_step_sort() -> None:
    from finetune.train import order

    order.sorted_within_steps = lambda drawn, lengths, rows_a_step: drawn


def without_conv() -> None:
    from finetune.train import packing

    packing.cpu_causal_conv1d = lambda hidden_states, weight, bias, activation, skip=0: None  # the caller's original


SWITCHES = {"loss-head": without_loss_head, "bf16-hand-back": without_bf16_hand_back,
            "fp32-adapters": without_fp32_adapters, "kept-freed": with_kept_freed_blocks,
            "delta-rule": without_delta_rule, "chunk-64": without_chunk_choice, "conv": without_conv,
            "step-sort": without_step_sort}


def main() -> None:
    names = sys.argv[1].split(",")
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        sys.exit(f"unknown switch {unknown}: choose from {', '.join(SWITCHES)}")
    for name in names:
        SWITCHES[name]()
    from finetune.cli import main as ft

    sys.argv = ["ft", *sys.argv[2:]]
    ft()


if __name__ == "__main__":
    main()
