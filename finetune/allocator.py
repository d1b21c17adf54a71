"""Freed memory handed back to the system before the evaluation `ft train` runs.

What was tried here for a CPU step's page faults, and dropped (bench/RESULTS.md 19, 20):
PyTorch's CPU tensors come from malloc, and glibc maps every block above its mmap threshold (at
most 32 MiB) afresh and unmaps it when freed, so every training step faults in its large
activations and logit tiles again, one 4 KiB page at a time (~11 µs a fault on the VMs measured).

- glibc told (`mallopt`) to keep freed blocks up to 1 GiB on its heap: faster over a few steps,
  but a padded batch's tensors change size every step, the heap fragments, and over the laptop
  recipe's 60-step epoch the process grew from 10.6 to 17 GiB while its steps slowed from 11.8 to
  14.5 s (shipped in RESULTS 19, removed in 20).
- PyTorch's transparent-huge-page switch (`THP_MEM_ALLOC_ENABLE=1`): the loss head's pass alone
  went from 385,000 faults and 2.09 s to 9,350 and 1.10 s, but inside training, with the
  kernel's defrag at `madvise`, each huge-page fault could stall on compaction: 74 s a step
  where 12 were expected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform


def release_freed_memory() -> None:
    """Hand memory Python has freed back to the system. glibc keeps freed heap pages after a large
    model is released (its mmap threshold rises as big blocks are freed), so the evaluation that
    `ft train` runs next would stack its model on top of the trained one's pages: the 0.8B's
    `ft train` peaked at 5.4 GiB where training took 3.1 (bench/RESULTS.md 10). malloc_trim
    returns every free page, whatever the thresholds."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (malloc_trim's home); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
