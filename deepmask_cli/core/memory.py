"""Keeping a long run's resident memory flat: freed memory given back to the OS.

Each photo's pass allocates and frees hundreds of megabytes of buffers whose
sizes follow the photo's size (pyramid canvases, trunk maps, pasted masks).
glibc's allocator keeps freed blocks in its heaps for reuse, and with sizes
that change from photo to photo they fragment: without help a long run's
resident memory creeps up photo after photo (benchmarks/memory.py shows the
curve). ``malloc_trim`` returns the heaps' free pages to the OS, but the next
photo then faults its pages in again, which costs time if done after every
photo. :class:`MemoryCap` trims only when the process has grown by
:data:`SLACK_MB` since its first photo: resident memory stays under that
ceiling, and trims are rare.

The torch runtime allocates each of a pass's tensors with ``malloc``, and
glibc serves buffers up to 32 MB from its heaps (its mmap threshold rises to
the size of the largest buffer freed), where they linger and fragment; the
largest maps, of the high-resolution levels, are mapped on their own, on top
of that. :func:`map_large_buffers` lowers the threshold so that every buffer
of :data:`MMAP_THRESHOLD_MB` or more gets its own pages and gives them back
when freed: the heaps then hold little between photos, and a large photo's
peak is its pass alone (``benchmarks/memory.py`` measures it). ONNX Runtime
serves its tensors from its own arena, so the int8 and ONNX runtimes leave the
threshold as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: How far resident memory may grow above what the process held after its
#: first batch before the free pages are given back.
SLACK_MB = 512

#: Buffers of at least this size get pages of their own from the OS and
#: return them when freed (:func:`map_large_buffers`).
MMAP_THRESHOLD_MB = 4

#: The ceiling once large buffers are mapped on their own: the heaps then
#: hold only small buffers, and the lower ceiling keeps a long run near its
#: first photos' level (``benchmarks/memory.py`` measures it).
MAPPED_SLACK_MB = 256

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, malloc.h


@functools.cache
def _libc(name: str, argtypes: tuple) -> object | None:
    """The C library's function ``name`` (int result), or None where the C
    library is not glibc (musl, macOS)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _malloc_trim():
    """glibc's ``malloc_trim``, or None."""
    return _libc("malloc_trim", (ctypes.c_size_t,))


def _mallopt():
    """glibc's ``mallopt``, or None."""
    return _libc("mallopt", (ctypes.c_int, ctypes.c_int))


def map_large_buffers(threshold_mb: int = MMAP_THRESHOLD_MB) -> bool:
    """Have glibc give every later buffer of ``threshold_mb`` MB or more its
    own pages, returned to the OS when it is freed, for the rest of the
    process. True if set; False where that is not possible (not glibc)."""
    fn = _mallopt()
    return bool(fn(_M_MMAP_THRESHOLD, threshold_mb * 2**20)) if fn is not None else False


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True if any were
    returned, False where that is not possible (not glibc)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def resident_bytes() -> int | None:
    """This process's resident memory, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryCap:
    """Call after each batch: the first call notes the resident memory, and
    any later call that finds it more than ``slack_mb`` above that gives the
    free pages back (:func:`release_free_memory`). Returns whether it did."""

    def __init__(self, slack_mb: int = SLACK_MB) -> None:
        self.slack = slack_mb * 2**20
        self.base: int | None = None
        #: Times the memory was given back.
        self.releases = 0

    def __call__(self) -> bool:
        rss = resident_bytes()
        if rss is None or _malloc_trim() is None:
            return False
        if self.base is None:
            self.base = rss
            return False
        if rss <= self.base + self.slack:
            return False
        self.releases += 1
        return release_free_memory()
