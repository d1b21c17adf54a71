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
    result = subprocess.run([sys.executable, "-m", "bench.gpu_train", "--size", "tiny", "--steps", "2",
                             "--batch-size", "2", "--max-length", "256", "--out", str(out)],
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
    # ft's clock leaves out the held-out loss it measures at step 0 (the TRL script measures none)
    assert ft["start_eval_excluded_s"] > 0 and "start_eval_excluded_s" not in trl
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
