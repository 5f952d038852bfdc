"""Giving the memory freed by one image back to the operating system.

Each photo's pass allocates and frees hundreds of megabytes of buffers whose
sizes follow the photo's size (pyramid canvases, trunk maps, pasted masks).
glibc's allocator keeps freed blocks in its heaps for reuse, and with sizes
that change from photo to photo they fragment: a long run's resident memory
creeps up photo after photo (benchmarks/memory.py shows the curve). Trimming
the heaps once per image returns the free pages, so the process holds what
the next image needs and no more. It costs a little time (the next image
faults its pages in again); docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library: musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True if any were
    returned, False where that is not possible (not glibc)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
