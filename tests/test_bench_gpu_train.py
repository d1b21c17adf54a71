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

    if not torch.cuda.is_available():
        assert "cannot run here" in contenders["ft (unsloth backend)"]["skipped"]
        assert "not run (1)" in result.stdout and "ft (unsloth backend) not run:" in result.stdout
