"""finetune/train/linear_attention.py against transformers' PyTorch delta rule and causal conv, and
all against fp64 references (the delta rule's recurrence token by token, the definition the
chunked algorithm rearranges; the conv in fp64): ft's rule inverts the UT system once where
transformers solves it twice, ft's conv sums its taps in blocks where transformers calls oneDNN,
the same in exact arithmetic; each must be as close to fp64 as transformers' is, in fp32 and
under CPU bf16 autocast (what training runs), for the output and every input's gradient. And a
Qwen3.5 twin's training step on a CPU must actually run through both.
Not exercised here: CUDA (ft's rule runs there only for packed rows without fla's kernels)."""

from __future__ import annotations

import pytest
import torch

from finetune.train.linear_attention import chunk_gated_delta_rule, cpu_chunk_size
from tests.test_packing import pytorch_of


def recurrence_fp64(query, key, value, g, beta):
    """Gated delta rule one token at a time, fp64: S ← S·exp(g_t); S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ;
    o_t = Sᵀ q_t, with q and k L2-normalized and q scaled by 1/√d_k."""
    q, k, v, g, beta = (x.double() for x in (query, key, value, g, beta))
    q = q / q.norm(dim=-1, keepdim=True) * q.shape[-1] ** -0.5
    k = k / k.norm(dim=-1, keepdim=True)
    batch, length, heads, k_dim = k.shape
    state = torch.zeros(batch, heads, k_dim, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None]
        remembered = (state * k[:, t, :, :, None]).sum(-2)
        state = state + k[:, t, :, :, None] * ((v[:, t] - remembered) * beta[:, t, :, None])[:, :, None, :]
        out.append((state * q[:, t, :, :, None]).sum(-2))
    return torch.stack(out, dim=1)


def inputs(seed: int):
    torch.manual_seed(seed)
    shape = (2, 150, 4, 32)  # 150: a partial last chunk of 64
    q, k, v = (torch.randn(shape) for _ in range(3))
    g, beta = -torch.rand(2, 150, 4) * 0.3, torch.rand(2, 150, 4)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def output_and_grads(rule, xs, autocast: bool):
    for x in xs:
        x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = rule(*xs)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a loss that weighs every output
    (out.double() * weights).sum().backward()
    return [out.detach().double()] + [x.grad.double() for x in xs]


def relative_error(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("chunk_size", [64, 48, 32])  # 32: what cpu_chunk_size picks for 150 tokens
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fts_delta_rule_is_as_close_to_fp64_as_transformers(autocast, chunk_size):
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from finetune.train.packing import segment_aware_linear_attention

    segment_aware_linear_attention()
    library = pytorch_of(qwen._ft_originals[1])  # transformers' own PyTorch delta rule
    xs = inputs(0)
    exact = output_and_grads(recurrence_fp64, xs, autocast=False)
    ours = output_and_grads(lambda *a: chunk_gated_delta_rule(*a, chunk_size=chunk_size), xs, autocast)
    theirs = output_and_grads(lambda q, k, v, g, b: library(q, k, v, g=g, beta=b, use_qk_l2norm_in_kernel=True)[0],
                              xs, autocast)
    for name, mine, lib, want in zip(["output", "q", "k", "v", "g", "beta"], ours, theirs, exact):
        # measured: fp32 both ~3e-7 from fp64; bf16 autocast both ~4e-3 (its matmuls' rounding, not the solve's)
        limit = 1.5 * relative_error(lib, want) + (1e-6 if not autocast else 1e-4)
        assert relative_error(mine, want) <= limit, (name, relative_error(mine, want), relative_error(lib, want))


def test_the_cpu_chunk_is_the_one_that_pads_least():
    # 222 tokens: 256 in 64s, 240 in 48s, 224 in 32s; 230: 240 in 48s; 250 and 256: 256 in 64s
    lengths = (222, 230, 240, 250, 256, 150, 70, 480, 512, 20)
    assert [cpu_chunk_size(n) for n in lengths] == [32, 48, 48, 64, 64, 32, 48, 48, 64, 32]
    assert cpu_chunk_size(40, chunk_size=1) == 1


def conv_reference_fp64(x, weight):
    """SiLU(causal depthwise conv) in fp64, transformers' definition: pad K-1 both sides, keep the first L."""
    channels, length = x.shape[1], x.shape[2]
    out = torch.nn.functional.conv1d(x.double(), weight.double().unsqueeze(1), padding=weight.shape[1] - 1,
                                     groups=channels)[:, :, :length]
    return torch.nn.functional.silu(out)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fts_causal_conv_is_as_close_to_fp64_as_transformers(autocast):
    """The layer hands the conv its projection transposed ([batch, channels, length], channel-last
    strides), in bf16 under autocast; both the output and the input's gradient are compared."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from finetune.train.linear_attention import cpu_causal_conv1d
    from finetune.train.packing import segment_aware_linear_attention

    segment_aware_linear_attention()
    library = pytorch_of(qwen._ft_originals[0])  # transformers' own PyTorch conv
    torch.manual_seed(0)
    dtype = torch.bfloat16 if autocast else torch.float32
    projected = torch.randn(2, 150, 96).to(dtype)  # what in_proj_qkv hands over: [batch, length, channels]
    weight = torch.randn(96, 4) * 0.5  # frozen fp32, as the checkpoint loads it
    weights_of_loss = torch.linspace(-1, 1, projected.numel()).reshape(2, 96, 150).double()

    def run(conv, precise: bool):
        x = (projected.double() if precise else projected).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and not precise):
            out = conv(x.transpose(1, 2))
        (out.double() * weights_of_loss).sum().backward()
        return out.detach().double(), x.grad.double()

    exact = run(lambda x: conv_reference_fp64(x, weight), precise=True)
    ours = run(lambda x: cpu_causal_conv1d(x, weight, None, "silu"), precise=False)
    theirs = run(lambda x: library(x, weight, None, activation="silu"), precise=False)
    assert ours[0].shape == theirs[0].shape == exact[0].shape
    for name, mine, lib, want in zip(["output", "input gradient"], ours, theirs, exact):
        # measured: fp32 both ~1e-7 from fp64; bf16 autocast both ~3e-3 (the weight and output roundings)
        limit = 1.5 * relative_error(lib, want) + (1e-6 if not autocast else 1e-4)
        assert relative_error(mine, want) <= limit, (name, relative_error(mine, want), relative_error(lib, want))
    with torch.no_grad():  # not a training step: the caller's original runs
        assert cpu_causal_conv1d(projected.transpose(1, 2), weight, None, "silu") is None


def test_a_cpu_training_step_of_a_qwen35_twin_runs_through_fts_pieces(qwen_twin, monkeypatch):
    """What training installs (segment_aware_linear_attention, on every CPU run) must be what a
    padded batch's forward and backward call in each linear-attention layer, and give the model's
    loss as transformers' own pieces do."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from finetune.train import packing

    calls = {"delta rule": 0, "conv": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(packing, "chunk_gated_delta_rule", counted("delta rule", packing.chunk_gated_delta_rule))
    monkeypatch.setattr(packing, "cpu_causal_conv1d", counted("conv", packing.cpu_causal_conv1d))
    model = AutoModelForCausalLM.from_pretrained(qwen_twin, dtype=torch.float32)
    model.requires_grad_(False)  # frozen, as under LoRA; the input's gradient still flows through every layer
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 70))
    embeds = model.get_input_embeddings()(ids).requires_grad_()

    def loss_and_input_grad():
        embeds.grad = None
        loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), embeds.grad.clone()

    packing.segment_aware_linear_attention()
    ours = loss_and_input_grad()
    layers = sum(t == "linear_attention" for t in model.config.get_text_config().layer_types)
    assert layers > 0 and calls == {"delta rule": layers, "conv": layers}
    monkeypatch.setattr(qwen, "torch_chunk_gated_delta_rule", qwen._ft_originals[1])
    monkeypatch.setattr(qwen, "causal_conv1d_fn", qwen._ft_originals[0])
    theirs = loss_and_input_grad()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-7)
