"""Padding-free packing changes the layout of a batch, never its result.

For both families the same examples are run padded (one per row, attention mask) and packed
(several per row, position ids and cu_seq_lens), through the real 4-bit base with LoRA adapters
whose B is non-zero: the losses and every adapter gradient must agree to fp32 tolerance.

Qwen3.5's linear-attention layers take one of two paths for packed rows: ft's PyTorch versions
(CPU, or a GPU without the kernels) and the fast kernels' varlen entry points (flash-linear-
attention, causal-conv1d; CUDA only). The whole-model test runs on each path the machine has and
says which it skipped. On a CPU the kernels' path is still checked piece by piece: ft's calls into
them (flattening, cu_seqlens, seq_idx layout) against reference functions that implement and
assert the kernels' documented contracts.
"""

from __future__ import annotations

import pytest
import torch

from finetune import render
from finetune import loading
from finetune.train.lora import load_model
from finetune.train.packing import (PackingCollator, VarlenKernels, best_fit_decreasing, find_varlen_kernels,
                              segment_aware_linear_attention)
from finetune.recipe import load_recipe
from tests.conftest import ROOT


def test_best_fit_decreasing_fills_bins_without_overflow():
    lengths = [300, 200, 180, 120, 90, 60, 40, 500]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) == 3  # 1490 tokens need at least 3 rows of 512


def test_collator_marks_every_example_start():
    batch = PackingCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
         {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [1, 2, 3, 4, 5, 6, 7, 8]},
         {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [1, 2, 3, 4, 5, 6]}])
    # rows as wide as the longest example (8): [8], [6 + 2], [3 + padding]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 8, 9],
                                           [5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(8)), [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, 5, 6, 7, 8], [-100, 2, 3, 4, 5, 6, -100, 9],
                                        [-100, 6, 7] + [-100] * 5]
    assert batch["cu_seq_lens_q"].tolist() == [0, 8, 14, 16, 19, 24]
    assert batch["ft_real_tokens"] == 19


def examples(recipe, prep, n: int = 10) -> list[dict]:
    """Real support conversations, some cut short so lengths vary across GDN chunk counts."""
    ds, _ = render.tokenize_all(prep.renderer, prep.splits.train[:n], recipe.data.max_length, "error")
    rows = [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(n)]
    for i, cut in zip(range(0, n, 3), (40, 70, 130, 65)):
        rows[i] = {k: v[:cut] for k, v in rows[i].items()}
    return rows


def padded(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    def fill(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": fill("input_ids", pad), "labels": fill("labels", -100), "attention_mask": mask}


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def close(got, want, dtype, what):
    """fp32: to rounding. bf16 (a GPU run): same direction and size within bf16's precision."""
    if dtype == torch.float32:
        rtol, atol = (1e-5, 1e-6) if got.dim() == 0 else (1e-4, 1e-6)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=what)
        return
    got, want = got.float().flatten(), want.float().flatten()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=0) if got.numel() > 1 else torch.tensor(1.0)
    assert cosine > 0.99 and (got - want).norm() <= 0.05 * want.norm() + 1e-6, (what, float(cosine))


def kernel_paths():
    """The linear-attention paths this machine can run packed rows through: PyTorch everywhere;
    fla's delta rule with ft's conv (what the GPU kit carries: causal-conv1d has no wheel for its
    image); both kernels."""
    found = find_varlen_kernels()
    gpu = torch.cuda.is_available()
    both = gpu and found.conv is not None and found.delta_rule is not None
    fla = gpu and found.delta_rule is not None
    no_gpu = "no CUDA GPU here"
    return [pytest.param(VarlenKernels(), id="pytorch"),
            pytest.param(VarlenKernels(delta_rule=found.delta_rule), id="fla",
                         marks=pytest.mark.skipif(not fla, reason=f"fla's delta rule: {no_gpu if not gpu else 'flash-linear-attention is not installed'}")),
            pytest.param(found, id="kernels", marks=pytest.mark.skipif(
                not both, reason=f"varlen kernels: {no_gpu if not gpu else 'flash-linear-attention and causal-conv1d are not both installed'}"))]


@pytest.mark.parametrize("kernels", kernel_paths())
@pytest.mark.parametrize("base", ["tiny-qwen3.5", "tiny-olmo3"])
def test_packed_loss_equals_unpacked(base, kernels, qwen_twin, olmo_twin):
    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", [f"model.base={base}", "train.gradient_checkpointing=false"])
    prep = loading.prepare(recipe)
    torch.manual_seed(0)
    model = load_model(recipe, prep, "hf")
    with torch.no_grad():  # fresh LoRA has B = 0; make the adapters part of the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    segment_aware_linear_attention(kernels)
    rows = examples(recipe, prep)
    packed = PackingCollator(prep.tokenizer.pad_token_id)(rows)
    assert packed.pop("ft_real_tokens") == sum(len(r["input_ids"]) for r in rows)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples really share rows

    def on_device(batch):
        return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # the tolerance follows the compute dtype, not the adapters': on CUDA the 4-bit matmuls run in
    # bf16 while the adapters are fp32
    dtype = loading.compute_dtype()
    try:
        want_loss, want_grads = loss_and_grads(model, on_device(padded(rows, prep.tokenizer.pad_token_id)))
        got_loss, got_grads = loss_and_grads(model, on_device(packed))
    finally:
        segment_aware_linear_attention()  # what training would install on this machine
    close(got_loss, want_loss, dtype, "loss")
    for name, want in want_grads.items():
        close(got_grads[name], want, dtype, name)


def at_value_heads(query, key, value):
    """q and k repeated to the value heads' count: transformers 5.17's PyTorch delta rule expects them
    repeated (its Qwen3.5 layer repeats before the call), newer ones repeat inside, fla takes either."""
    ratio = value.shape[2] // key.shape[2]
    return query.repeat_interleave(ratio, dim=2), key.repeat_interleave(ratio, dim=2)


def pytorch_of(function):
    """transformers' own PyTorch function beneath its hub-kernel wrappers. Where fla imports (any
    CUDA box, the GPU kit included), `use_kernel_func_from_hub_with_fallback` sends calls to fla's
    Triton kernel, with CPU tensors too in transformers 5.17 ("0 active drivers"); in 5.25 the
    wrapper is also held by a `kernels` Func module. The reference must be the PyTorch code itself."""
    import inspect

    forward = getattr(type(function), "forward", None)
    if isinstance(function, torch.nn.Module) and forward is not None and forward.__closure__:
        cells = dict(zip(forward.__code__.co_freevars, forward.__closure__))
        function = cells["func"].cell_contents
    return inspect.unwrap(function)


def test_the_reference_is_transformers_pytorch_delta_rule():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    segment_aware_linear_attention()  # keeps transformers' function (as imported) in _ft_originals
    reference = pytorch_of(qwen._ft_originals[1])
    assert reference.__module__ == qwen.__name__ and reference.__name__ == "torch_chunk_gated_delta_rule"
    assert isinstance(reference, type(pytorch_of)) and not hasattr(reference, "__wrapped__")


def fla_contract(query, key, value, g, beta, cu_seqlens=None, use_qk_l2norm_in_kernel=False, **kwargs):
    """What fla's chunk_gated_delta_rule computes with cu_seqlens, asserting what it demands:
    one row, and each sequence run on its own from a zero state."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    assert query.shape[0] == 1, "fla takes cu_seqlens only for a batch of one"
    segment_aware_linear_attention()
    original = pytorch_of(qwen._ft_originals[1])  # transformers' own PyTorch delta rule
    assert not kwargs.get("initial_state") and not kwargs.get("output_final_state")
    query, key = at_value_heads(query, key, value)
    bounds = cu_seqlens.tolist()
    parts = [original(
        *(x[:, a:b] for x in (query, key, value)), g=g[:, a:b], beta=beta[:, a:b],
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1), None


def conv_contract(x, weight, bias=None, seq_idx=None, activation=None, **kwargs):
    """What causal_conv1d_fn computes with seq_idx, asserting what its CUDA kernel checks:
    int32, contiguous, [batch, length], and x channel-last."""
    import torch.nn.functional as F

    batch, channels, length = x.shape
    assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and seq_idx.shape == (batch, length)
    assert x.stride(1) == 1, "seq_idx is only supported for channel-last x"
    out = torch.empty_like(x)
    for b in range(batch):
        change = [0] + [t for t in range(1, length) if seq_idx[b, t] != seq_idx[b, t - 1]] + [length]
        for a, e in zip(change[:-1], change[1:]):
            piece = F.conv1d(x[b:b + 1, :, a:e], weight.unsqueeze(1), bias, padding=weight.shape[1] - 1,
                             groups=channels)[:, :, :e - a]
            out[b:b + 1, :, a:e] = F.silu(piece) if activation in ("silu", "swish") else piece
    return out


def test_calls_into_the_varlen_kernels_keep_sequences_apart():
    """ft's packed path through the fast kernels, with reference functions standing in for the
    CUDA kernels: the same result as ft's PyTorch path, sequence by sequence."""
    from finetune.train.packing import segment_causal_conv1d, segment_delta_rule

    torch.manual_seed(0)
    starts = torch.tensor([0, 150, 187, 200, 251, 320, 400], dtype=torch.int32)  # 2 rows of 200
    q, k = torch.randn(2, 200, 2, 32), torch.randn(2, 200, 2, 32)
    v, g, beta = torch.randn(2, 200, 4, 32), -torch.rand(2, 200, 4) * 0.3, torch.rand(2, 200, 4)
    via_kernel = segment_delta_rule(None, VarlenKernels(delta_rule=fla_contract, device_types=("cpu",)))
    via_torch = segment_delta_rule(None, VarlenKernels())
    kwargs = dict(g=g, beta=beta, cu_seqlens=starts, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(via_kernel(q, k, v, **kwargs)[0], via_torch(q, k, v, **kwargs)[0], rtol=1e-4, atol=1e-5)

    x = torch.randn(2, 200, 96).transpose(1, 2)  # channel-last, as the layer hands it over
    weight = torch.randn(96, 4)
    conv_kernel = segment_causal_conv1d(None, VarlenKernels(conv=conv_contract, device_types=("cpu",)))
    conv_torch = segment_causal_conv1d(None, VarlenKernels())
    for layout in (x, x.contiguous()):  # a contiguous [b, c, l] input is laid out channel-last first
        torch.testing.assert_close(conv_kernel(layout, weight, None, activation="silu", cu_seq_lens_q=starts),
                                   conv_torch(layout, weight, None, activation="silu", cu_seq_lens_q=starts),
                                   rtol=1e-5, atol=1e-5)
    assert "ft's PyTorch version" in VarlenKernels().describe()


def test_gated_deltanet_pieces_restart_at_every_sequence():
    """The two stateful pieces of a Gated DeltaNet layer, packed vs one sequence at a time, on
    random inputs of the 9B's head layout; the library's own functions on the packed row leak."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from finetune.train.linear_attention import chunk_gated_delta_rule
    from finetune.train.packing import segment_causal_conv1d

    segment_aware_linear_attention()
    torch.manual_seed(0)
    lengths = [150, 37, 64, 90]  # boundaries inside chunks, on a chunk edge, and a short one
    starts = torch.tensor([0, 150, 187, 251, 341], dtype=torch.int32)
    total = sum(lengths)
    q, k = torch.randn(1, total, 2, 32), torch.randn(1, total, 2, 32)
    v = torch.randn(1, total, 4, 32)
    g = -torch.rand(1, total, 4) * 0.3
    beta = torch.rand(1, total, 4)
    segment = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None]
    one_by_one = torch.cat([
        chunk_gated_delta_rule(*(x[:, a:b] for x in (q, k, v, g, beta)), torch.zeros(1, b - a, dtype=torch.long))
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())], dim=1)
    packed = chunk_gated_delta_rule(q, k, v, g, beta, segment)
    torch.testing.assert_close(packed, one_by_one, rtol=1e-4, atol=1e-5)
    # one sequence, no boundary: identical to transformers' own implementation
    reference, _ = pytorch_of(qwen._ft_originals[1])(*at_value_heads(q, k, v), v, g=g, beta=beta,
                                                    use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, beta, torch.zeros_like(segment)),
                               reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference, one_by_one, atol=1e-3)  # without boundaries, state leaks

    x = torch.randn(1, 96, total)
    weight, bias = torch.randn(96, 4), torch.randn(96)
    conv = segment_causal_conv1d(lambda *a, **kw: None)
    separate = torch.cat([qwen.F.conv1d(x[:, :, a:b], weight.unsqueeze(1), bias, padding=3, groups=96)[:, :, :b - a]
                          for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())], dim=2)
    torch.testing.assert_close(conv(x, weight, bias, cu_seq_lens_q=starts), separate, rtol=1e-5, atol=1e-5)
    leaky = qwen.F.conv1d(x, weight.unsqueeze(1), bias, padding=3, groups=96)[:, :, :total]
    assert not torch.allclose(leaky, separate, atol=1e-3)


def test_packed_conv_keeps_only_its_input_for_the_backward():
    """The PyTorch segment conv builds K-1 shifted copies of x; kept for the backward they cost
    the 0.8B 2.8 GiB at batch 4 (bench/RESULTS.md 10). It is recomputed in the backward instead:
    the saved bytes are about one x (the library's unpacked conv1d keeps x too), and the output and
    both gradients equal the conv kept whole, bit for bit."""
    from finetune.train.packing import _segment_ids, segment_causal_conv1d, segment_conv1d_torch

    torch.manual_seed(0)
    batch, channels, length, kernel = 2, 64, 96, 4
    cu = torch.tensor([0, 30, 96, 150, 192], dtype=torch.int32)
    segment = _segment_ids(cu, batch, length)
    weight = torch.randn(channels, kernel, requires_grad=True)
    conv = segment_causal_conv1d(original=None)

    def run(fn):
        x = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
        weight.grad = None
        (out * torch.linspace(-1, 1, length)).sum().backward()
        return out.detach(), x.grad, weight.grad.clone(), sum(saved.values())

    got = run(lambda x: conv(x, weight, None, activation="silu", cu_seq_lens_q=cu))
    whole = run(lambda x: segment_conv1d_torch(x, weight, None, "silu", segment))
    x_bytes = batch * channels * length * 4
    assert got[3] <= 1.5 * x_bytes, f"the packed conv keeps {got[3] / x_bytes:.1f}× its input for the backward"
    assert whole[3] > 3 * x_bytes  # what it kept before (so this test measures the right thing)
    for a, b in zip(got[:3], whole[:3]):
        assert torch.equal(a, b)
