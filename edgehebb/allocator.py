"""glibc's allocator, told once per process to keep freed memory: what torch's CPU hot loops need."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing freed blocks back to the kernel (once per process; glibc only).

    A learning step, or an NNL block's forward pass on a few frames, allocates and frees blocks of
    0.2-1.6 MB (fig2_left's cosine map is 1.3 MB per 32 x 32 frame). glibc serves blocks above its mmap
    threshold with fresh pages and trims the freed top of the heap, so the next call faults every page
    back in: a learning step took 9 ms instead of 5 ms on a shared core (~800 page faults a step,
    measured with getrusage), and fig2_left's forward pass on one frame 1.4 ms instead of 0.57 ms.
    Blocks below 32 MB now come from the heap, and up to 64 MB of free heap is kept. This is
    process-wide: it is set by the first CPU learner or torch inference backend of a process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and other C libraries: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))
