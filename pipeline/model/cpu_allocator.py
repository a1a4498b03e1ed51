"""Keep freed CPU memory in the process, so large activations are not page-faulted in on every pass.

glibc serves allocations above 32 MiB (a pack's SwiGLU activations are 8192 x 4096 floats) with a
fresh mmap, and frees per-thread heaps back to the kernel, which zeroes every page again on the next
touch. On CPU that costs 10-25% of a forward pass, in system time. Ray Data runs a UDF on a worker
thread, in a per-thread arena, so the settings must hold from the process's start: the job gives its
CPU embedding actors GLIBC_TUNABLES; a process that only embeds on its main thread (the benchmark)
can call keep_freed_memory() instead. Either changes malloc for the whole process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

KEEP_FREED_BYTES = 1 << 30
# One arena (threads share the main heap), no mmap for large blocks, up to 1 GiB kept after free.
GLIBC_TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={KEEP_FREED_BYTES}"

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large allocations on this thread from the heap and keep up to 1 GiB of it after free.

    Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # Where the heap cannot grow, glibc still falls back to mmap: no allocation fails because of this.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
