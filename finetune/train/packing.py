"""Padding-free packing: the examples of a batch share rows, with their boundaries kept.

A padded batch spends compute on pad tokens: with real length variety (support conversations of
80 to 900 tokens) a quarter to a third of every step is padding. `PackingCollator` lays the same
examples (the same ones, in the same steps, so the optimisation is the unpacked one) into rows as
wide as the batch's longest example, best fit decreasing, and marks where each example starts.
Rows no wider than a padded batch's keep attention's quadratic cost at or below the padded one
(one long row of all examples would multiply it on CPU, where SDPA has no variable-length path).

- `position_ids` restart at 0 for every example. With no `attention_mask`, transformers builds a
  block-diagonal causal mask from them (masking_utils.find_packed_sequence_indices), so full and
  sliding attention never look across examples, and RoPE sees each example from position 0.
- `cu_seq_lens_q` / `cu_seq_lens_k` (cumulative lengths over the flattened batch, the names
  transformers' flash-attention path reads) reach every layer through the model's **kwargs.
- `use_cache: False`: a recurrent cache of a packed row would mix examples.

Qwen3.5's Gated DeltaNet layers carry state along the sequence (a causal conv1d and the delta-rule
recurrence). transformers hands them `cu_seq_lens_q`, but its PyTorch fallbacks ignore it, and
with causal-conv1d installed transformers passes the kernel no `seq_idx`: either way a packed row
would leak state from one example into the next. `segment_aware_linear_attention()` wraps both
functions. On CUDA tensors, when the fast kernels are installed (flash-linear-attention,
causal-conv1d; see `VarlenKernels`), it calls their variable-length entry points: fla's chunked
delta rule with `cu_seqlens` over the batch flattened to one row (fla takes cu_seqlens only for a
batch of one), causal-conv1d with a `seq_idx` per position. Otherwise it runs ft's PyTorch
versions (the conv below, the delta rule in finetune/train/linear_attention.py), written by hand
because no library has a boundary-aware CPU version. Neither path
reads a device value on the host per layer (fla computes its chunk index once per forward and
caches it by tensor identity; every layer gets the same cu_seqlens tensor).
tests/test_packing.py proves that packed and unpacked losses and gradients agree to fp32 tolerance
for both families, on whichever path the machine has.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable

import torch

from finetune.train import shared_prefix
from finetune.train.linear_attention import chunk_gated_delta_rule, cpu_causal_conv1d, cpu_chunk_size

IGNORE = -100
REAL_TOKENS = "ft_real_tokens"


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens (each length is ≤ capacity)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


@dataclass
class PackingCollator:
    """Batch of {input_ids, labels} examples → packed rows with position ids and boundaries."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) for e in examples]
        rows = best_fit_decreasing([len(x) for x in ids], max(map(len, ids)))
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        starts = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(ids[i])
                input_ids[r, at:at + n] = torch.tensor(ids[i])
                out_labels[r, at:at + n] = torch.tensor(labels[i])
                out_labels[r, at] = IGNORE  # a start is never a target (unpacked, the shift drops it)
                position_ids[r, at:at + n] = torch.arange(n)
                starts.append(r * width + at)
                at += n
            if at < width:  # the row's padding is one more sequence of its own, never a target
                position_ids[r, at:] = torch.arange(width - at)
                starts.append(r * width + at)
        cu = torch.tensor(sorted(starts) + [len(rows) * width], dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        return {"input_ids": input_ids, "labels": out_labels, "position_ids": position_ids,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len,
                "use_cache": False,  # a cache of a packed row would mix examples
                REAL_TOKENS: sum(map(len, ids))}  # for tokens/s; SafeTrainer takes it out


# --- Gated DeltaNet with sequence boundaries ---------------------------------------------------

@dataclass(frozen=True)
class VarlenKernels:
    """The fast kernels' variable-length entry points, where installed (CUDA only).

    conv: causal_conv1d.causal_conv1d_fn(x, weight, bias, seq_idx=..., activation=...)
    delta_rule: fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=...)
    """

    conv: Callable | None = None
    delta_rule: Callable | None = None
    device_types: tuple[str, ...] = ("cuda",)  # where they run (a test may hand in CPU references)

    def serve(self, kernel: Callable | None, tensor: torch.Tensor) -> bool:
        return kernel is not None and tensor.device.type in self.device_types

    def describe(self) -> str:
        """For the run manifest: which code computed the linear-attention layers of packed rows."""
        parts = []
        for name, dist, fn in (("delta rule", "flash-linear-attention", self.delta_rule),
                               ("conv1d", "causal-conv1d", self.conv)):
            parts.append(f"{name}: {dist} {_version(dist)} (varlen)" if fn else f"{name}: ft's PyTorch version")
        return "; ".join(parts)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def find_varlen_kernels() -> VarlenKernels:
    """Import what is installed; a package that fails to import (no triton, no CUDA build) counts
    as absent, the same rule transformers applies to its own kernel fallbacks."""
    conv = delta_rule = None
    try:
        from causal_conv1d import causal_conv1d_fn as conv
    except Exception:
        conv = None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as delta_rule
    except Exception:
        delta_rule = None
    return VarlenKernels(conv, delta_rule)


def _segment_ids(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, length] index of the sequence each position belongs to (no host sync)."""
    marks = torch.zeros(batch * length, dtype=torch.long, device=cu_seqlens.device)
    marks[cu_seqlens[1:-1].long()] = 1
    return marks.cumsum(0).view(batch, length)


def segment_causal_conv1d(original, kernels: VarlenKernels = VarlenKernels()):
    """causal_conv1d_fn whose window stops at each sequence start (as zero padding would); on a
    CPU it also takes a padded batch's training calls to ft's conv."""

    def conv(hidden_states, weight, bias=None, activation=None, cu_seq_lens_q=None, **kwargs):
        if cu_seq_lens_q is None:  # a padded batch: ft's conv in a CPU training step, else the original
            hidden_states, front = shared_prefix.conv_input(hidden_states, weight.shape[-1])
            out = cpu_causal_conv1d(hidden_states, weight, bias, activation, front)
            if out is None:
                out = original(hidden_states, weight, bias, activation=activation, **kwargs)[:, :, front:]
            return out
        batch, _, length = hidden_states.shape  # [batch, channels, length]
        segment = _segment_ids(cu_seq_lens_q, batch, length)
        if kernels.serve(kernels.conv, hidden_states):
            return varlen_conv1d(kernels.conv, hidden_states, weight, bias, activation, segment)
        if torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad):
            # The PyTorch conv below builds K-1 shifted, masked copies of x; kept for the backward
            # they cost the 0.8B 2.8 GiB at batch 4 (bench/RESULTS.md 10; the library's unpacked
            # conv1d keeps x alone). Recomputed in the backward instead: elementwise, exact.
            from torch.utils.checkpoint import checkpoint

            return checkpoint(segment_conv1d_torch, hidden_states, weight, bias, activation, segment,
                              use_reentrant=False)
        return segment_conv1d_torch(hidden_states, weight, bias, activation, segment)

    return conv


def segment_conv1d_torch(hidden_states, weight, bias, activation, segment):
    """The depthwise causal conv of Qwen3.5's linear attention, its window stopped at every
    sequence start: out[t] = sum_s w[K-1-s] · x[t-s] over the s where t-s is in t's sequence."""
    from transformers.activations import ACT2FN

    x = hidden_states.to(weight.dtype)
    kernel = weight.shape[-1]
    out = x * weight[:, kernel - 1, None]
    for shift in range(1, kernel):
        same = torch.zeros_like(segment, dtype=torch.bool)
        same[:, shift:] = segment[:, shift:] == segment[:, :-shift]
        shifted = torch.zeros_like(x)
        shifted[:, :, shift:] = x[:, :, :-shift]
        out = out + shifted * same[:, None, :] * weight[:, kernel - 1 - shift, None]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def varlen_conv1d(kernel, x, weight, bias, activation, segment):
    """causal-conv1d with `seq_idx`: its kernel checks for an int32, contiguous [batch, length]
    index and a channel-last x (stride 1 over channels); transformers' layer already hands it
    channel-last (a transposed projection), anything else is laid out so."""
    if x.stride(1) != 1:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    seq_idx = segment.to(torch.int32).contiguous()
    return kernel(x, weight, bias, seq_idx=seq_idx, activation=activation)


def segment_delta_rule(original, kernels: VarlenKernels = VarlenKernels()):
    """chunk_gated_delta_rule that restarts from a zero state at every sequence start; on a CPU
    it also takes a padded batch's stateless calls (training, the held-out loss) to ft's rule."""

    def rule(query, key, value, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, chunk_size=64, **kwargs):
        stateless = initial_state is None and not output_final_state
        if cu_seqlens is None and stateless and query.device.type == "cpu":  # a padded batch on a CPU
            final = [] if shared_prefix.recording() else None  # a shared prefix's state, for its rows
            out = chunk_gated_delta_rule(query, key, value, g, beta, None, cpu_chunk_size(query.shape[1], chunk_size),
                                         use_qk_l2norm_in_kernel, shared_prefix.initial_state(query.shape[0]), final)
            if final:
                shared_prefix.record_state(final[0])
            return out, None
        if cu_seqlens is None or not stateless:
            return original(query, key, value, g=g, beta=beta, cu_seqlens=cu_seqlens, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                            chunk_size=chunk_size, **kwargs)
        if kernels.serve(kernels.delta_rule, query):
            return varlen_delta_rule(kernels.delta_rule, query, key, value, g, beta, cu_seqlens,
                                     use_qk_l2norm_in_kernel), None
        segment = _segment_ids(cu_seqlens, *query.shape[:2])
        if query.device.type == "cpu":
            chunk_size = cpu_chunk_size(query.shape[1], chunk_size)
        return chunk_gated_delta_rule(query, key, value, g, beta, segment, chunk_size, use_qk_l2norm_in_kernel), None

    return rule


def varlen_delta_rule(kernel, query, key, value, g, beta, cu_seqlens, l2norm: bool) -> torch.Tensor:
    """fla's chunked delta rule over the packed batch flattened to one row: fla accepts
    cu_seqlens only with batch 1, and every packed row starts a sequence (the collator marks each
    row start), so the flattened row has the same sequences. Back to [batch, length, ...]."""
    batch, length = query.shape[:2]
    flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in (query, key, value, g, beta)]
    out, _ = kernel(*flat, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=l2norm)
    return out.reshape(batch, length, *out.shape[2:])


def missing_kernels_note(family, gpu: bool, kernels: VarlenKernels | None = None) -> str | None:
    """What a user must hear before training on CUDA when the family's linear-attention kernels are
    not installed: transformers then runs Qwen3.5's Gated DeltaNet layers (3 of every 4) as an fp32
    PyTorch loop. transformers #48718 measured the 9B at 1.22 s a step that way against 0.70 s
    with flash-linear-attention. None on a CPU (no kernels exist there) and for other families."""
    if not gpu or not family.linear_attention_kernels:
        return None
    kernels = find_varlen_kernels() if kernels is None else kernels
    have = {"flash-linear-attention": kernels.delta_rule, "causal-conv1d": kernels.conv}
    missing = [name for name in family.linear_attention_kernels if have.get(name) is None]
    if not missing:
        return None
    return (f"{family.name}'s linear-attention layers will run without {' and '.join(missing)}, in transformers' "
            "PyTorch loop: about 1.7× slower per step (9B: 1.22 s against 0.70 s, transformers #48718); "
            f"pip install {' '.join(missing)}")


def segment_aware_linear_attention(kernels: VarlenKernels | None = None) -> VarlenKernels:
    """Install the boundary-aware functions in transformers' Qwen3.5 module; returns the kernels
    packed rows will use. Called again, it re-wraps transformers' originals (a test can switch
    paths). Without cu_seq_lens_q (a padded batch) the originals run, except on a CPU: there the
    delta rule is ft's where no state goes in or out (not in generation), and so is the conv in a
    training step (finetune/train/linear_attention.py; installed for every CPU run, packed or not)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    kernels = find_varlen_kernels() if kernels is None else kernels
    originals = getattr(qwen, "_ft_originals", None)
    if originals is None:
        originals = qwen._ft_originals = (qwen.causal_conv1d_fn, qwen.torch_chunk_gated_delta_rule)
    qwen.causal_conv1d_fn = segment_causal_conv1d(originals[0], kernels)
    qwen.torch_chunk_gated_delta_rule = segment_delta_rule(originals[1], kernels)
    return kernels
