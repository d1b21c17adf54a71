"""finetune/allocator.py: freed blocks kept for reuse change where the memory comes from, never a
number. Each side runs in its own process (the setting is process-wide and cannot be undone):
the same forward and backward of a model whose activations are above glibc's default mmap
threshold, then the gradients compared bit for bit and the page faults of the later steps
counted. Not exercised here: macOS's and musl's allocators, where the switch does nothing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

STEPS = r"""
import hashlib, json, resource, sys
import torch
from finetune import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
# 4 x 2048 x 1024 fp32 activations: 32 MiB a tensor, at glibc's largest default mmap threshold
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(2)])
x = torch.randn(8, 1024, 1024)
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.zero_grad(set_to_none=True)
    torch.nn.functional.gelu(model(x)).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
digest = hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps(dict(kept=kept, faults=faults, digest=digest)))
"""


def run_steps(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_is_reused_and_changes_no_gradient():
    default, kept = run_steps("default"), run_steps("keep")
    assert kept["kept"] and not default["kept"]
    assert kept["digest"] == default["digest"]  # the same bits: only where the memory comes from moved
    # Once the heap has grown to what a step needs (a step or two), a step takes no new pages,
    # where the default maps (and faults in) the large blocks again every step.
    later_default, later_kept = sum(default["faults"][3:]), sum(kept["faults"][3:])
    assert later_kept * 10 < later_default, (default["faults"], kept["faults"])
