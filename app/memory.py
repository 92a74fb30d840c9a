"""Giving freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Returns the free pages of the C heap to the OS (glibc `malloc_trim(0)`); False where unavailable.

    Why: CPython hands strings and containers over 512 bytes (an uploaded example's text, the lists and buffers
    around them) to malloc, and glibc keeps what they freed in the process's heap for reuse: only memory at the
    very top of the heap is returned by itself, so after a large request the process stays at its peak resident
    size although nothing uses those pages. `malloc_trim(0)` releases every whole free page, anywhere in the heap
    (and its other arenas). Costs a walk over the heap's free lists: call it after requests that allocated much,
    not per small request."""
    trim = _malloc_trim()
    if trim is None:
        return False
    try:
        trim(0)
    except OSError:  # pragma: no cover - a C library whose symbol misbehaves
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
