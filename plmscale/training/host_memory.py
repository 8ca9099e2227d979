"""Training on the CPU: keep the memory a step frees for the next step.

On an accelerator, PyTorch's caching allocator hands a step's freed activations to the next step. On the
CPU they come from glibc's malloc, which gives blocks above its mmap threshold back to the kernel when they
are freed, and trims the heap's free top: every step then faults its largest activations in again (the
4 x 256 GPT benchmark shape: ~30,000 page faults, 50-80 ms of kernel time in a 500 ms step). Fixed
thresholds keep them in the heap; PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) gets the same
by preloading jemalloc or tcmalloc. The price: the heap stays at its high-water mark, a little above the
default's peak (the benchmark shapes: +26 and +59 MiB of ~700).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# A tensor larger than this is a one-off (a checkpoint's buffer), not a step's activation: mmapped.
MMAP_THRESHOLD = 1 << 30
# mallopt(3)'s documented upper limit on 64-bit; current glibc accepts more, older glibc refuses it.
DOCUMENTED_MAX_MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt's int: the heap keeps up to 2 GiB free at its top


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed blocks. False, with nothing set, where the C library is not glibc
    or where the user tunes malloc (MALLOC_*_ or GLIBC_TUNABLES in the environment): theirs win."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc" in tunables or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_set = any(
        mallopt(M_MMAP_THRESHOLD, value) for value in (MMAP_THRESHOLD, DOCUMENTED_MAX_MMAP_THRESHOLD)
    )
    return mmap_set and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
