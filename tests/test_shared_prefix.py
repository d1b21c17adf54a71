"""finetune/train/shared_prefix.py: a micro-batch's common leading tokens computed once give the
padded batch's loss and gradients. References: the same batch through the same model without
sharing (fp32: to rounding; bf16 autocast: no further from fp32 than the unshared batch is),
on the three families' layer kinds (Qwen3.5's linear and full attention, OLMo 3's sliding
windows, SmolLM2's real weights); the delta rule carried across the split against fp64.
Not exercised here: a GPU (sharing is CPU-only: fla's kernels would carry the state there)."""

from __future__ import annotations

import pytest
import torch

from finetune.train import shared_prefix
from finetune.train.linear_attention import chunk_gated_delta_rule
from tests.test_linear_attention import inputs, output_and_grads, recurrence_fp64, relative_error
from tests.test_train import recipe_for


def test_the_shared_length_stops_before_any_difference_padding_or_label():
    ids = torch.arange(40).repeat(3, 1)
    mask, labels = torch.ones_like(ids), torch.full_like(ids, -100)
    ids[1, 30] = 99  # row 1 differs at 30: 29 shared (the token after them must be unlabelled and common)
    assert shared_prefix.shared_length(ids, mask, labels) == 29
    labels[2, 20:] = 7  # row 2's answer starts at 20: the prefix ends before the token that predicts it
    assert shared_prefix.shared_length(ids, mask, labels) == 19
    mask[0, 10:] = 0  # a row of 10 real tokens: sharing 9 is below the minimum
    assert shared_prefix.shared_length(ids, mask, labels) == 0
    assert shared_prefix.shared_length(ids[:1], mask[:1], labels[:1]) == 0  # one row: nothing to share


@pytest.mark.parametrize("split", [37, 64, 100])  # inside a chunk, on a chunk's end, another
def test_the_delta_rule_carried_across_a_split_is_the_whole_rows(split):
    """The prefix's state handed to the rest gives the whole row's outputs and gradients (fp64
    recurrence as the reference; ft's rule over the whole row as the yardstick)."""
    def carried(q, k, v, g, beta):
        state = []
        head = chunk_gated_delta_rule(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split],
                                      chunk_size=32, final_state=state)
        rest = chunk_gated_delta_rule(q[:, split:], k[:, split:], v[:, split:], g[:, split:], beta[:, split:],
                                      chunk_size=32, initial_state=state[0])
        return torch.cat([head, rest], dim=1)

    xs = inputs(0)
    exact = output_and_grads(recurrence_fp64, xs, autocast=False)
    whole = output_and_grads(lambda *a: chunk_gated_delta_rule(*a, chunk_size=32), xs, autocast=False)
    split_up = output_and_grads(carried, xs, autocast=False)
    for name, got, yardstick, want in zip(["output", "q", "k", "v", "g", "beta"], split_up, whole, exact):
        limit = 1.5 * relative_error(yardstick, want) + 1e-6  # measured: both ~3e-7 from fp64
        assert relative_error(got, want) <= limit, (name, relative_error(got, want), relative_error(yardstick, want))


def lora_gradients(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def both_ways(tmp_path, monkeypatch, base: str, *settings: str) -> dict:
    """Train one step of `base` and, on its first training micro-batch, compute the loss and the
    adapters' gradients with the prefix shared and without; returns them and what was shared."""
    from finetune.run import RunDir
    from finetune.train.guard import SafeTrainer
    from finetune.train.runner import train

    seen: dict = {}
    original = SafeTrainer.compute_loss

    def compare(self, model, batch, return_outputs=False, num_items_in_batch=None):
        if model.training and not seen:
            seen["applies"] = self.shared_prefix
            seen["shared"] = shared_prefix.shared_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
            seen["rows"] = tuple(batch["input_ids"].shape)
            for share in (False, True):
                self.shared_prefix = share
                model.zero_grad(set_to_none=True)
                with self.compute_loss_context_manager():
                    loss = original(self, model, dict(batch), False, num_items_in_batch)
                loss.backward()
                seen[share] = (float(loss.detach()), lora_gradients(model))
            self.shared_prefix = seen["applies"]
            model.zero_grad(set_to_none=True)
        return original(self, model, batch, return_outputs, num_items_in_batch)

    monkeypatch.setattr(SafeTrainer, "compute_loss", compare)
    recipe = recipe_for(base, "data.limit=8", "data.heldout_max=4", "train.max_steps=1", "train.packing=false",
                        "train.rehearsal=0", "eval.after_train=false", "train.save_steps=100", *settings)
    train(recipe, RunDir(tmp_path / base))
    return seen


def gradient_error(got: dict, want: dict) -> float:
    """The adapters' gradients as one vector: relative error."""
    assert got.keys() == want.keys() and want
    return (sum(float((got[n] - want[n]).norm() ** 2) for n in want)
            / sum(float(want[n].norm() ** 2) for n in want)) ** 0.5


@pytest.mark.parametrize("base", ["tiny-qwen3.5", "tiny-olmo3", "smollm2-135m"])
def test_a_shared_prefix_gives_the_padded_batchs_loss_and_gradients(tmp_path, monkeypatch, base):
    """fp32 (train.cpu_bf16=false): sharing the system prompt's tokens changes the loss and every
    adapter's gradient only by rounding. The OLMo 3 twin's sliding window (64) is shorter than its
    rows: the mask must keep it."""
    seen = both_ways(tmp_path, monkeypatch, base, "train.cpu_bf16=false", "train.batch_size=4")
    assert seen["applies"] and seen["shared"] >= 16, seen.get("shared")  # ~44 twin tokens, 23 SmolLM2 ones
    (loss, grads), (shared_loss, shared_grads) = seen[False], seen[True]
    assert abs(shared_loss - loss) <= 1e-5 * abs(loss)  # measured: equal, or 2e-7 apart
    assert gradient_error(shared_grads, grads) < 1e-5  # measured: 5e-7 (Qwen3.5), 7e-7, 5e-6 (SmolLM2)


def test_under_bf16_autocast_sharing_adds_no_error_to_the_batchs_own(tmp_path, monkeypatch):
    """bf16 autocast (what a CPU with native bf16 trains in) rounds the shared and the per-row
    computation differently; measured against the fp32 gradients of the same batch, sharing must
    be no further off than not sharing."""
    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("bf16 autocast is emulated on this CPU: ft trains in fp32 here (train.cpu_bf16 auto)")
    fp32 = both_ways(tmp_path / "fp32", monkeypatch, "tiny-qwen3.5", "train.cpu_bf16=false", "train.batch_size=4")
    bf16 = both_ways(tmp_path / "bf16", monkeypatch, "tiny-qwen3.5", "train.cpu_bf16=true", "train.batch_size=4")
    reference = fp32[False][1]
    unshared, shared = gradient_error(bf16[False][1], reference), gradient_error(bf16[True][1], reference)
    assert shared <= 1.2 * unshared + 1e-4, (shared, unshared)  # measured: 1.07% and 1.06%
    assert abs(bf16[True][0] - bf16[False][0]) < 1e-3  # measured: 8e-5 on a loss of 6.72


def test_training_shares_only_where_the_hooks_cover_the_path(qwen_twin):
    """Packed rows and gradient checkpointing take the plain path (their forwards run outside the
    two passes); a padded CPU run shares."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_twin, attn_implementation="sdpa")
    assert shared_prefix.applies(model, packed=False, checkpointing=False)
    assert not shared_prefix.applies(model, packed=True, checkpointing=False)
    assert not shared_prefix.applies(model, packed=False, checkpointing=True)
    eager = AutoModelForCausalLM.from_pretrained(qwen_twin, attn_implementation="eager")
    assert not shared_prefix.applies(eager, packed=False, checkpointing=False)


def test_the_conv_with_left_context_is_the_whole_conv_without_its_first_outputs():
    """A shared prefix's last K-1 conv inputs put in front of a row: ft's conv drops their outputs
    itself; the rest of the output and every gradient bit for bit those of the whole conv sliced."""
    from finetune.train.linear_attention import cpu_causal_conv1d

    torch.manual_seed(0)
    weight = torch.randn(48, 4) * 0.3
    for autocast in (False, True):
        x = torch.randn(2, 40, 48).transpose(1, 2).requires_grad_()  # the layer's [batch, channels, length] view
        upstream = torch.randn(2, 48, 37)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            whole = cpu_causal_conv1d(x, weight, None, "silu")[:, :, 3:]
            whole.backward(upstream.to(whole.dtype))
            want = x.grad.clone()
            x.grad = None
            skipped = cpu_causal_conv1d(x, weight, None, "silu", skip=3)
            skipped.backward(upstream.to(skipped.dtype))
        assert torch.equal(skipped, whole) and torch.equal(x.grad, want), autocast
