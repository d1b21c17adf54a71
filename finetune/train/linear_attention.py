"""Qwen3.5's Gated DeltaNet layers (3 of every 4) as ft trains them in PyTorch: the chunked delta
rule where fla's kernels do not run (every CPU; a GPU without flash-linear-attention when rows
are packed), and the causal conv1d in a CPU's training step.

**The delta rule**: transformers' `torch_chunk_gated_delta_rule` (5.23), the same chunked
algorithm and operations, with two changes:

- **Sequence boundaries inside a row** (`segment`, for packed rows; None for a padded batch):
  four masks so that nothing crosses from one sequence into the next (`segment[b, t]` numbers
  each position's sequence):
  - within a chunk, pairs (i, j) from different sequences get no decay weight (so neither the
    UT system nor the intra-chunk attention couples them);
  - a position reads the state carried in from earlier chunks only if it belongs to the
    sequence that was running when the chunk began ("carry");
  - the state leaving a chunk keeps the carried state only if the chunk has no boundary, and
    takes updates only from the chunk's last sequence.
  Packed rows then cost exactly what their real tokens cost: no per-sequence padding.
- **The UT system inverted once**: transformers solves the same unit lower-triangular system
  twice, once for the values and once for the decayed keys (128 right-hand sides each, and
  twice again in the backward); its inverse (64 right-hand sides: the identity) times both is
  the same in exact arithmetic, and the products are two fp32 batched matmuls. fla's kernels
  compute the inverse too. On 2 CPU cores, the 0.8B's layer at 4 × 222 tokens: forward and
  backward 0.12 → 0.09 s (bench/RESULTS.md 19).

On a CPU the chunk is the one of 64 (the model's), 48 and 32 that pads the row least
(`cpu_chunk_size`): the rule pads every row to whole chunks, and its time follows the padded
length: a batch of support tickets whose longest is 230 tokens is 256 in chunks of 64 and 240 in
chunks of 48. Where two pad the same, the larger: the same work in fewer, wider steps. The
result is the same in exact arithmetic (tests/test_linear_attention.py).

**The causal conv** (`CausalConv1dSilu`): transformers' PyTorch fallback casts the layer's bf16
input to fp32 for the fp32 conv weight, autocast casts it back to bf16 for oneDNN's conv, the
output is sliced (a strided tensor the SiLU and its backward then walk slowly) and transposed,
and the heads' reshape copies it again: ~40 ms of copies and strided elementwise work a layer at
4 × 222, about 10% of the 0.8B's step. ft computes the same K-tap depthwise conv as K shifted
multiply-adds in the layout the projection hands over ([batch, length, channels], contiguous),
in fp32 blocks of positions that stay in cache, with the weight rounded as autocast rounds it;
it rounds the sum to the compute dtype once (as the conv's output is), applies SiLU there and
keeps the rounded sum for SiLU's backward: 39.5 → 18.6 ms a layer, forward and backward.

tests/test_linear_attention.py holds both to transformers' functions and to fp64 references.
Written here because no library has a CPU version: fla's and causal-conv1d's kernels are CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_gated_delta_rule(query, key, value, g, beta, segment=None, chunk_size=64, l2norm=True,
                           initial_state=None, final_state: list | None = None):
    """The layer's output [batch, length, v_heads, v_dim], from `initial_state` ([batch, v_heads,
    k_dim, v_dim], fp32; None: zero); `segment`: [batch, length] sequence index of every position
    (None: one sequence a row). `final_state`, a list, gets the state after the last position
    (trailing padding leaves it unchanged: its keys, values and decays are zero)."""
    dtype = query.dtype
    batch, length, k_heads, k_dim = key.shape
    v_heads, v_dim = value.shape[-2:]
    if k_heads != v_heads:
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    query, key, value, beta, decay = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                                      for x in (query, key, value, beta, g)]
    if l2norm:
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    query = query * query.shape[-1] ** -0.5

    pad = (chunk_size - length % chunk_size) % chunk_size
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    beta, decay = (F.pad(x, (0, pad)) for x in (beta, decay))
    chunks = (length + pad) // chunk_size

    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = [x.reshape(batch, v_heads, chunks, chunk_size, x.shape[-1])
                                  for x in (query, key, k_beta, v_beta)]
    decay = decay.reshape(batch, v_heads, chunks, chunk_size)
    cross = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=query.device).triu(1)
    carry = in_last = last_carry = None
    if segment is not None:
        # trailing pad: a sequence of its own (an id above any real one, known without a host sync)
        seg = F.pad(segment, (0, pad), value=batch * length).reshape(batch, 1, chunks, chunk_size)
        cross = cross | (seg.unsqueeze(-1) != seg.unsqueeze(-2))  # [b, 1, n, i, j]
        prev_last = torch.cat([seg[:, :, :1, :1] - 1, seg[:, :, :-1, -1:]], dim=2)  # sequence running into the chunk
        carry = (seg == prev_last).to(torch.float32)  # [b, 1, n, c]
        in_last = (seg == seg[..., -1:]).to(torch.float32)  # position belongs to the chunk's last sequence
        last_carry = carry[..., -1]

    def masked(x, mask):
        return x if mask is None else x * mask

    cum_decay = decay.cumsum(dim=3)
    pairwise = (cum_decay.unsqueeze(4) - cum_decay.unsqueeze(3)).masked_fill(cross, float("-inf")).exp()

    ut_system = (k_beta @ key.transpose(-1, -2)) * pairwise
    intra_chunk_attn = (query @ key.transpose(-1, -2)) * pairwise
    decayed_k_beta = k_beta * masked(cum_decay.exp(), carry).unsqueeze(-1)
    eye = torch.eye(chunk_size, dtype=ut_system.dtype, device=ut_system.device).expand_as(ut_system)
    inverse = torch.linalg.solve_triangular(ut_system, eye, upper=False, unitriangular=True)
    with torch.autocast(query.device.type, enabled=False):  # fp32, as transformers' solves are
        new_values, k_cumdecay = inverse @ v_beta, inverse @ decayed_k_beta

    if initial_state is None:
        state = torch.zeros(batch, v_heads, k_dim, v_dim, dtype=new_values.dtype, device=new_values.device)
    else:
        state = initial_state.to(new_values.dtype)
    query = query * masked(cum_decay.exp(), carry).unsqueeze(-1)
    key = key * masked((cum_decay[..., -1:] - cum_decay).exp(), in_last).unsqueeze(-1)
    chunk_decay = masked(cum_decay[..., -1].exp(), last_carry)[..., None, None]
    # The scan reads each chunk whole: split once into contiguous chunk-major pieces (unbind's
    # backward stacks the pieces' gradients once), and the outputs stacked once. transformers
    # indexes [:, :, i] and writes out[:, :, i]: in the backward every index zero-fills and adds
    # a whole-tensor gradient and every write clones one, O(chunks²) memory traffic: the 0.8B's
    # layer at 4 × 217 (7 chunks), backward 60 → 45 ms (bench/RESULTS.md 21).
    pieces = [x.movedim(2, 0).contiguous().unbind(0)
              for x in (new_values, k_cumdecay, query, intra_chunk_attn, key.transpose(-1, -2), chunk_decay)]
    outs = []
    for new_value, k_cum, q, attn, k_t, decay_i in zip(*pieces):
        v_new = new_value - k_cum @ state
        outs.append(q @ state + attn @ v_new)
        state = state * decay_i + k_t @ v_new
    if final_state is not None:
        final_state.append(state)
    out = torch.stack(outs, dim=2).reshape(batch, v_heads, -1, v_dim)[:, :, :length]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)


def cpu_chunk_size(length: int, chunk_size: int = 64) -> int:
    """The chunk of `chunk_size`, ¾ or ½ of it that pads `length` least; the larger on a tie. On 2
    cores the 0.8B's layer, forward and backward at 4 rows, tracks the padded length: 222 tokens
    0.111 s in chunks of 64 (256), 0.098 in 32s (224); 230 tokens 0.116 → 0.100 in 48s (240);
    250 tokens 0.114 in 64s, 0.125 in 48s (288)."""
    def padded(chunk: int) -> int:
        return -(-length // chunk) * chunk
    candidates = [c for c in (chunk_size, chunk_size * 3 // 4, chunk_size // 2) if c > 0]
    return min(candidates, key=lambda c: (padded(c), -c))


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else fallback


ROWS_A_BLOCK = 16  # positions whose fp32 sums stay in cache (16 × 6,144 channels × 4 bytes × batch 4)


class CausalConv1dSilu(torch.autograd.Function):
    """SiLU(causal depthwise conv(x)) for x [batch, channels, length] (any strides), weight
    [channels, K] frozen; out [batch, channels, length], a view of a [batch, length, channels]
    tensor (what the layer transposes back to next). In the compute dtype (autocast's, where on;
    else the weight's): the weight rounded to it, the taps summed in fp32, the sum rounded once;
    the rounded sum is kept for the backward, as the SiLU autograd keeps its input."""

    @staticmethod
    def forward(ctx, x, weight, skip: int = 0):
        """`skip`: x's first positions are left context only (a shared prefix's last inputs,
        finetune/train/shared_prefix.py), read by the taps but given no output. Dropped here, not
        sliced off by the caller: a slice's backward would hand the gradient over as a
        [batch, channels, length] tensor that this layout transposes again."""
        dtype = compute_dtype(x.device.type, weight.dtype)
        taps = weight.to(dtype).float()
        rows = x.transpose(1, 2).contiguous()  # [batch, length, channels]: free for the layer's layout
        before = torch.empty(rows.shape, dtype=dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start, end, total in _blocks(rows, taps, reach=-1):
                before[:, start:end] = total
            out = torch.nn.functional.silu(before[:, skip:])
        ctx.save_for_backward(before, taps)
        ctx.input_dtype, ctx.skip = x.dtype, skip
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        before, taps = ctx.saved_tensors
        skip = ctx.skip
        grad_x = torch.empty(before.shape, dtype=ctx.input_dtype, device=before.device)
        with torch.autocast(before.device.type, enabled=False):
            grad_before = torch.ops.aten.silu_backward(grad.transpose(1, 2).to(before.dtype), before[:, skip:])
            if skip:  # the context positions have no output: no gradient of their own
                grad_before = torch.nn.functional.pad(grad_before, (0, 0, skip, 0))
            for start, end, total in _blocks(grad_before, taps, reach=+1):  # out[t] read x[t - s]
                grad_x[:, start:end] = total
        return grad_x.transpose(1, 2), None, None


def _blocks(rows, taps, reach: int):
    """Over blocks of positions t of rows [batch, length, channels]: (start, end, fp32 sum over
    shifts s of taps[:, K-1-s] · rows[t + reach·s]) (zero outside 0..length-1). reach -1 is the
    causal conv; +1 its transpose, the input's gradient. In blocks, so the fp32 sums are made and
    read in cache: one pass over the whole tensor per tap took 12 ms a layer at 4 × 222."""
    kernel, length = taps.shape[1], rows.shape[1]
    for start in range(0, length, ROWS_A_BLOCK):
        end = min(start + ROWS_A_BLOCK, length)
        total = rows[:, start:end] * taps[:, kernel - 1]  # fp32: the taps are
        for shift in range(1, kernel):
            lo, hi = (max(start, shift), end) if reach < 0 else (start, min(end, length - shift))
            if lo < hi:
                total[:, lo - start:hi - start].addcmul_(rows[:, lo + reach * shift:hi + reach * shift],
                                                         taps[:, kernel - 1 - shift])
        yield start, end, total


def cpu_causal_conv1d(hidden_states, weight, bias, activation, skip: int = 0) -> torch.Tensor | None:
    """CausalConv1dSilu where it applies (a CPU training step: frozen weight, no bias, SiLU),
    without outputs for the first `skip` positions; None elsewhere, for the caller's original."""
    if (hidden_states.device.type != "cpu" or not torch.is_grad_enabled() or weight.requires_grad
            or bias is not None or activation not in ("silu", "swish") or hidden_states.dim() != 3):
        return None
    return CausalConv1dSilu.apply(hidden_states, weight, skip).to(hidden_states.dtype)
