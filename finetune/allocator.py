"""glibc's malloc in a training process: freed memory kept for the next step, and handed back
before the evaluation.

PyTorch's CPU tensors come from malloc, with no cache of their own. glibc serves every block
above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and unmaps it when freed, so
every training step asks the kernel again for the same large activations, gradients and logit
tiles, and faults in and zeroes every page of them before the first write (~11 µs a fault on
the VMs measured): Qwen3.5-0.8B's loss head alone, 5 passes over 191 rows, took 3.7 million page
faults and ran 1.75× slower for them (bench/RESULTS.md 19).

`keep_freed_memory` raises the mmap threshold and the trim threshold so that blocks up to
`KEEP_BYTES` come from the heap and stay there when freed, reused by the next step's
allocations of the same sizes (what a caching allocator does on a GPU). Blocks above it (the
model's weights, loaded once) are still mapped and unmapped as before. The cost is memory: the
heap keeps what was freed, and blocks of other sizes fragment it, so the peak rises (the 0.8B at
4 × 512: +0.55 GiB on 10 GiB without gradient checkpointing; +1.05 GiB on 5 GiB with it, over
preflight's estimate, bench/RESULTS.md 19). So training keeps them only where preflight left
gradient checkpointing off, which it does when its estimate fits in half the available RAM.

Written here because neither PyTorch nor the training libraries set it: PyTorch's CPU allocator
is plain malloc, and the usual advice (LD_PRELOAD of jemalloc or tcmalloc, Intel's for its
extension) needs the allocator installed and the process started under it. `mallopt` is glibc's
own switch for the same behaviour, set from inside the process. Elsewhere (macOS, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

KEEP_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; and up to 1 GiB free at its top kept
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks up to KEEP_BYTES for reuse; whether it was set.
    For a CPU training process only (a merge frees what it wrote and should give it back)."""
    libc = glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both are plain ints in glibc's interface
    return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(KEEP_BYTES))
                and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(KEEP_BYTES)))


def release_freed_memory() -> None:
    """Hand memory Python has freed back to the system. glibc keeps freed heap pages after a large
    model is released (its mmap threshold rises as big blocks are freed, and keep_freed_memory
    raises it on purpose), so the evaluation that `ft train` runs next would stack its model on
    top of the trained one's pages: the 0.8B's `ft train` peaked at 5.4 GiB where training took 3.1
    (bench/RESULTS.md 10). malloc_trim returns every free page, whatever the thresholds."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (mallopt's and malloc_trim's home); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
