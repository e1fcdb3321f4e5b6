"""Giving freed heap memory back to the operating system.

glibc keeps memory freed by large, short-lived buffers (decoded images, request bodies, base64 copies) inside its
heaps: after glibc raises its dynamic mmap threshold (up to 32 MB) such buffers come from the heap, and freed
holes below the top are never returned. A burst of four 36 MP images left the gateway at ~1 GB RSS while idle.
``malloc_trim(0)`` releases every free page of every arena (measured: 1,033 MB -> 42 MB after such a burst).
A fixed, low mmap threshold does it too (4 MB: 1,033 -> 43 MB standalone), but would make every large tensor in
the model service a fresh mmap (page faults on each forward pass). So every server trims when it goes idle, and
the gateway alone, whose large buffers are short-lived image decodes and bodies, also limits its arenas and fixes
the mmap threshold (both set up by ``siglip.server.connections``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_ARENA_MAX = -8
GATEWAY_MMAP_THRESHOLD = 4 * 1024 * 1024


def _load_glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None
    return libc


_libc = _load_glibc()


def limit_arenas(count: int = 2) -> bool:
    """At most ``count`` malloc arenas for threads created from now on (glibc's default is 8 per core): each
    decode thread's arena otherwise keeps its own share of a burst (measured with ``trim_heap``: 4 x 36 MP images
    left 171 MB of a 103 MB idle gateway with the default, 148 MB with 2). False where glibc is absent."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(M_ARENA_MAX, count))


def fix_mmap_threshold(size: int = GATEWAY_MMAP_THRESHOLD) -> bool:
    """Allocations of ``size`` bytes or more get their own mapping, unmapped as soon as they are freed; setting it
    also stops glibc from raising the threshold (to 32 MB) after the first large free. False without glibc."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(M_MMAP_THRESHOLD, size))


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library has no malloc_trim."""
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True
