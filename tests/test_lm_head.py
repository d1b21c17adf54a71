"""ft's CPU LM head (finetune/lm_head.py) against an fp64 reference and TRL's own function.

Stated tolerances:
- fp32 (a CPU without native bf16): log-probabilities, entropy and the hidden states' gradient
  equal TRL's and the fp64 reference's to summation order (1e-5 relative).
- bf16 autocast: the logits are the same bf16 GEMM TRL computes, so the forward outputs equal
  TRL's to 1e-4; the gradient is one bf16 GEMM rounded once (TRL's accumulates in fp32), so it
  is held to bf16's unit roundoff (2^-8) against fp64, and to 1.5× TRL's own error.
- On a model: the loss and every LoRA gradient of the 4-bit twin under bf16 autocast, ft's head
  against TRL's head, both against the fp32 path.
What this cannot exercise: TRL's Triton head (GPU only); a CPU without native bf16 runs the bf16
cases in emulation (same numbers, slower).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from finetune import lm_head

OUTPUTS = ("log_probs", "entropy", "is_top1")


def trl_head():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def problem(rows=37, hidden=64, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.3
    h = torch.randn(rows, hidden, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:5] = (h[:5] @ weight.t()).argmax(-1)  # some rows whose label is the argmax
    return h, weight, targets


def run(head, h, weight, targets, bf16: bool, entropy_weight: float = 0.0):
    h = h.clone().requires_grad_(True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        log_probs, entropy, _, _, top1 = head.apply(h, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)
    (-log_probs.sum() + entropy_weight * entropy.sum()).backward()
    return log_probs.detach(), entropy.detach(), top1, h.grad


def reference(h, weight, targets, entropy_weight: float = 0.0):
    h = h.double().clone().requires_grad_(True)
    log_p = torch.log_softmax(h @ weight.double().t(), -1)
    log_probs = log_p.gather(1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    (-log_probs.sum() + entropy_weight * entropy.sum()).backward()
    return log_probs.detach(), entropy.detach(), h.grad


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(params=["kept probabilities", "projected again"])
def kept(request, monkeypatch):
    """Both backward paths, over several row tiles (the small budget splits 37 rows into 5)."""
    monkeypatch.setattr(lm_head, "ROW_TILE_BYTES", 8 * 1000 * 4)
    monkeypatch.setattr(lm_head, "KEPT_PROBS_BYTES", 1 << 30 if request.param == "kept probabilities" else 0)
    return request.param


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cpu_head_equals_trls_and_the_fp64_reference(kept, bf16):
    h, weight, targets = problem()
    ft = run(lm_head.fused_head_for_cpu(trl_head()), h, weight, targets, bf16)
    trl = run(trl_head(), h, weight, targets, bf16)
    ref = reference(h, weight, targets)
    forward_tol = 1e-4 if bf16 else 1e-5
    assert torch.allclose(ft[0], trl[0], atol=forward_tol, rtol=forward_tol)
    assert torch.allclose(ft[1], trl[1], atol=forward_tol, rtol=forward_tol)
    assert torch.equal(ft[2], trl[2]) and ft[2][:5].all()
    ft_error, trl_error = relative(ft[3], ref[2]), relative(trl[3], ref[2])
    if bf16:
        assert ft_error <= 2 ** -8 and ft_error <= 1.5 * trl_error, (ft_error, trl_error)
    else:
        assert ft_error <= 1e-5 and relative(ft[0], ref[0]) <= 1e-5, ft_error


def test_entropy_gradient_equals_trls(kept):
    """SFT logs the entropy without a gradient; a loss that trains on it gets TRL's gradient."""
    h, weight, targets = problem(seed=1)
    ft = run(lm_head.fused_head_for_cpu(trl_head()), h, weight, targets, False, entropy_weight=0.3)
    ref = reference(h, weight, targets, entropy_weight=0.3)
    assert relative(ft[3], ref[2]) <= 1e-5
    assert torch.allclose(ft[1].double(), ref[1], rtol=1e-5)


def test_the_heads_tiles_are_kept_and_a_later_forward_sends_the_earlier_backward_to_projecting_again(kept):
    """The vocabulary-wide tiles live in lm_head.WORKSPACE: a second pass of as many rows or fewer
    takes no new buffer. The kept probabilities are one buffer, so a forward made between
    another's forward and backward (two micro-batches' forwards, then both backwards) takes it
    over; the earlier backward must notice and project again, giving the fp64 reference's
    gradient, not the later rows' probabilities."""
    lm_head.release_workspace()
    head = lm_head.fused_head_for_cpu(trl_head())
    h, weight, targets = problem()
    run(head, h, weight, targets, bf16=False)
    kept_at = {name: buffer.data_ptr() for name, buffer in lm_head.WORKSPACE.buffers.items()}
    run(head, h[:20], weight, targets[:20], bf16=False)
    assert {name: buffer.data_ptr() for name, buffer in lm_head.WORKSPACE.buffers.items()} == kept_at
    assert ("probs" in kept_at) == (kept == "kept probabilities")

    first, second = h.clone().requires_grad_(True), (h * 0.5).requires_grad_(True)
    first_log_probs = head.apply(first, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)[0]
    second_log_probs = head.apply(second, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)[0]
    (-second_log_probs.sum()).backward()
    (-first_log_probs.sum()).backward()
    assert relative(first.grad, reference(h, weight, targets)[2]) <= 1e-5
    assert relative(second.grad, reference(h * 0.5, weight, targets)[2]) <= 1e-5


def test_what_the_cpu_head_does_not_handle_goes_to_trl_unchanged():
    calls = []

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append(args)
            return trl_head().apply(*args)

    head = lm_head.fused_head_for_cpu(Counting)
    h, weight, targets = problem()
    trained = weight.clone().requires_grad_(True)
    cases = [(h, weight, torch.zeros(weight.shape[0]), 1.0, None, 1.0, OUTPUTS),  # a bias
             (h, trained, None, 1.0, None, 1.0, OUTPUTS),  # a trained head
             (h, weight, None, 0.7, None, 1.0, OUTPUTS),  # a temperature
             (h, weight, None, 1.0, 30.0, 1.0, OUTPUTS),  # softcapping (Gemma)
             (h, weight, None, 1.0, None, 0.5, OUTPUTS),  # a logit scale (Granite)
             (h, weight, None, 1.0, None, 1.0, ("log_probs", "mean_logits"))]
    for hidden, w, bias, temperature, softcap, scale, outputs in cases:
        head.apply(hidden, w, bias, targets, temperature, 256, softcap, scale, outputs)
    assert len(calls) == len(cases)
    head.apply(h, weight, None, targets, 1.0, 256, None, 1.0, OUTPUTS)
    assert len(calls) == len(cases)


def test_the_kept_bf16_head_is_made_once_and_again_when_the_weight_changes():
    """A stale copy would score against an old head silently; where copies are not kept (low
    RAM), none is left on the weight."""
    _, weight, _ = problem()
    assert lm_head.head_copy(weight, torch.bfloat16) is not lm_head.head_copy(weight, torch.bfloat16)
    assert not hasattr(weight, "ft_head_copy")
    weight.ft_keep_copy = True
    first = lm_head.head_copy(weight, torch.bfloat16)
    assert lm_head.head_copy(weight, torch.bfloat16) is first
    assert torch.equal(first, weight.to(torch.bfloat16))
    with torch.no_grad():
        weight.mul_(2)
    again = lm_head.head_copy(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    assert lm_head.head_copy(weight, torch.float32).data_ptr() == weight.data_ptr()  # no copy in fp32


@pytest.mark.slow
def test_loss_and_lora_gradients_of_the_4bit_twin_match_trls_head(monkeypatch):
    """The trainer's path: TRL's fused forward on the 4-bit twin with LoRA, its compact rows,
    ft's head against TRL's head under bf16 autocast; both against the fp32 path (TRL's head,
    no autocast). ft's error may not exceed TRL's by more than bf16's rounding of one GEMM."""
    from trl.trainer import utils as trl_utils

    from tests.test_gradients import twin_model

    model, batch = twin_model("tiny-support.yaml", ["quantization.cpu_dequantized_copies=true"])
    head = model.get_output_embeddings().weight
    assert getattr(head, "ft_keep_copy", False)  # loading marks the head where it keeps the 4-bit copies
    trl_utils.add_fused_lm_head(model.get_base_model(), outputs=OUTPUTS)
    original = trl_head()
    lm_head.score_only_trained_positions()
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", original)

    def loss_and_grads(head, bf16: bool):
        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", head)
        model.zero_grad()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with context:
            loss = model(**batch, fused_lm_head=True).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    scored = []
    real_apply = lm_head.CpuLogProbs.apply
    monkeypatch.setattr(lm_head.CpuLogProbs, "apply", lambda *args: scored.append(args[0].shape) or real_apply(*args))
    fp32_loss, fp32_grads = loss_and_grads(original, False)
    ft_fp32_loss, ft_fp32_grads = loss_and_grads(lm_head.fused_head_for_cpu(original), False)
    trl_loss, trl_grads = loss_and_grads(original, True)
    ft_loss, ft_grads = loss_and_grads(lm_head.fused_head_for_cpu(original), True)
    assert head.ft_head_copy[1].dtype == torch.bfloat16  # the bf16 head was kept, not cast per call
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert [rows[0] for rows in scored] == [labelled, labelled], scored  # only ft's runs, only labelled rows
    assert abs(ft_fp32_loss - fp32_loss) <= 1e-5 * abs(fp32_loss)
    assert all(relative(ft_fp32_grads[n], fp32_grads[n]) <= 1e-4 for n in fp32_grads)
    assert abs(ft_loss - trl_loss) <= 1e-4 * abs(trl_loss), (ft_loss, trl_loss)
    errors = {n: (relative(ft_grads[n], fp32_grads[n]), relative(trl_grads[n], fp32_grads[n])) for n in fp32_grads}
    worst = {n: e for n, e in errors.items() if e[0] > 1.5 * e[1] + 2 ** -8}
    assert not worst, worst
    print(f"loss fp32 {fp32_loss:.6f}, TRL's head {trl_loss:.6f}, ft's {ft_loss:.6f}; worst LoRA gradient error "
          f"against fp32: TRL's head {max(e[1] for e in errors.values()):.2e}, ft's {max(e[0] for e in errors.values()):.2e}")
