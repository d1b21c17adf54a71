"""bench/gpu_train.py at tiny size on this machine: a check of the script itself (its contenders
run to the end, its table and JSON carry real, consistent numbers), not a measurement. The
full-size run needs a GPU; unsloth is listed as not run, with the reason, where it cannot run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_train_bench_runs_every_contender_it_can(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "bench.gpu_train", "--size", "tiny", "--steps", "4",
                             "--warmup-steps", "2", "--batch-size", "2", "--max-length", "256", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    contenders = record["contenders"]
    assert set(contenders) == {"ft (hf backend)", "ft (unsloth backend)", "TRL docs QLoRA script"}
    for name in ("ft (hf backend)", "TRL docs QLoRA script"):
        c = contenders[name]
        assert c["real_tokens"] > 0 and c["train_runtime_s"] > 0
        assert c["real_tokens_per_s"] == pytest.approx(c["real_tokens"] / c["train_runtime_s"], rel=0.01)
        assert math.isfinite(c["heldout_loss"]) and 0 < c["heldout_loss"] < 20
    ft, trl = contenders["ft (hf backend)"], contenders["TRL docs QLoRA script"]
    # the same examples for the same steps: the real tokens trained agree (packing drops only padding)
    assert abs(ft["real_tokens"] - trl["real_tokens"]) <= 0.05 * trl["real_tokens"]
    assert trl["ft_hf_speedup"] == pytest.approx(ft["real_tokens_per_s"] / trl["real_tokens_per_s"], rel=0.01)
    assert ft["loaded"]["quant_type"] == ["nf4"] and "default" not in ft["loaded"]["kept_16bit"]
    import torch

    # each contender's figures were on disk as soon as it finished (an overrun keeps them)
    partial = json.loads(out.with_suffix(".partial.json").read_text())["contenders"]
    assert partial["ft (hf backend)"]["tokens"] == ft["real_tokens"]
    # both clocks start after the warm-up steps: steps 3 and 4 of 4, about half the tokens each trained
    assert "steps 3-4 timed" in result.stdout
    if not torch.cuda.is_available():
        assert "cannot run here" in contenders["ft (unsloth backend)"]["skipped"]
        assert "not run (1)" in result.stdout and "ft (unsloth backend) not run:" in result.stdout


def test_the_held_out_evaluator_feeds_the_model_on_its_own_device():
    """bench/gpu_train.py loads each adapter's model with device_map={"": 0}, which attaches no
    hook moving inputs to the GPU: the evaluator must put every batch on the model's device. Here
    the model says it lives on the meta device and its forward checks where its inputs are (this
    machine has no second device; the CUDA run itself needs a GPU)."""
    import torch

    from bench.train_throughput import mean_token_loss

    class Reached(Exception):
        pass

    class OnAnotherDevice(torch.nn.Module):
        device = torch.device("meta")

        def forward(self, input_ids, attention_mask):
            assert input_ids.device == attention_mask.device == self.device, (input_ids.device, self.device)
            raise Reached

    rows = [([1, 2, 3, 4], [-100, -100, 3, 4]), ([5, 6], [-100, 6])]
    with pytest.raises(Reached):
        mean_token_loss(OnAnotherDevice(), rows, pad=0)


def test_the_timed_window_starts_after_the_warm_up_steps():
    from bench.gpu_train import timed_window

    clock = [(1, 9.0, 100), (2, 10.0, 200), (3, 11.0, 300), (4, 11.5, 400)]
    assert timed_window(clock, 2) == (1.5, 200)  # steps 3 and 4: from the log at step 2 to the last
    assert timed_window(clock, 0) == (11.5, 400)  # no warm-up: from train() beginning
    assert timed_window(clock[:2], 3) == (10.0, 200)  # fewer steps than the warm-up: the whole run


def test_one_loaded_base_scores_every_adapter_as_separate_loads_do(tmp_path):
    """bench's evaluator loads the base once and switches adapters: each adapter's held-out loss
    equals the one from a base loaded for it alone."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from bench.train_throughput import heldout_losses, mean_token_loss
    from finetune import loading, render
    from finetune.recipe import load_recipe

    recipe_path = ROOT / "recipes" / "tiny-support.yaml"
    recipe = load_recipe(recipe_path)
    prep = loading.prepare(recipe)
    adapters = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_peft_model(loading.load_base_model(recipe, prep.base),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / f"a{seed}")
        adapters[f"adapter {seed}"] = tmp_path / f"a{seed}"
    together = heldout_losses(recipe_path, adapters)
    ds, _ = render.tokenize_all(prep.renderer, prep.splits.heldout, recipe.data.max_length, "truncate")
    rows = list(zip(ds["input_ids"], ds["labels"]))
    for name, path in adapters.items():
        alone = PeftModel.from_pretrained(loading.load_base_model(recipe, prep.base), str(path)).eval()
        assert together[name] == pytest.approx(mean_token_loss(alone, rows, prep.tokenizer.pad_token_id), abs=1e-6)
    assert together["adapter 0"] != together["adapter 1"]


def test_the_text_only_bench_checkpoint_loads_as_training_loads_it(tmp_path):
    """bench/gpu_train.py's 9B checkpoint leaves out the vision tower and the MTP head (training
    reads neither): written so at the twin's widths, it has neither and ft loads it, 4-bit, and
    runs it. The full widths need a GPU's memory and time; the writer is the same."""
    import torch

    from bench.full_size import write_checkpoint
    from finetune import loading
    from finetune.bases import resolve_base
    from finetune.recipe import load_recipe
    from finetune.twins import QWEN35_TEXT

    folder = tmp_path / "qwen3.5-text-only"
    write_checkpoint(folder, "tiny-qwen3.5-hub", {**QWEN35_TEXT, "mtp_num_hidden_layers": 1}, None, text_only=True)
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert keys and not [k for k in keys if "visual" in k or "mtp" in k]
    assert any("language_model" in k for k in keys)  # the hub layout otherwise
    recipe = load_recipe(ROOT / "recipes" / "tiny-support.yaml", [f"model.base={folder}"])
    model = loading.load_base_model(recipe, resolve_base(str(folder)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.get_text_config().vocab_size
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
