"""Keep the C heap's freed memory while inverting on CPU (glibc only).

An inversion step allocates the generator's activations and their gradients and frees them
again, at the same sizes, thousands of times. By default glibc returns freed memory at the top
of its heap to the system once more than 64 MiB of it is free (``M_TRIM_THRESHOLD``, raised
dynamically) and serves allocations of 32 MiB and more by ``mmap``: either way the next step
takes every page of that memory back through a page fault and the kernel zeroes it. On the
zoo's 64x64 DCGAN (1.3 MB of saved activations per row) that is about 200 page faults per row
and step, a fifth of the step's time at 64 rows (bench/results/cpu_heap.md).

While :func:`keep_freed_memory` is active the heap keeps up to ``TRIM_WHILE_ACTIVE`` bytes of
free memory at its top and serves blocks under ``MMAP_THRESHOLD`` from the heap, so the pages
of one step are reused by the next. On leaving (the last of nested or concurrent users), the
trim threshold goes back to 64 MiB and free memory is returned with ``malloc_trim``: the
process then behaves as glibc's dynamic thresholds would after freeing any block of 32 MiB or
more. Set ``RONAN_FAST_CPU_HEAP=0`` to leave the allocator alone. Other C libraries (musl,
macOS, Windows) are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: blocks under this size come from the heap (glibc's largest allowed value on 64-bit systems)
MMAP_THRESHOLD = 32 << 20
#: free memory the heap may keep at its top while an inversion runs
TRIM_WHILE_ACTIVE = 1 << 30
#: trim threshold afterwards: glibc's dynamic value once a block of MMAP_THRESHOLD was freed
TRIM_AFTER = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_users = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not glibc or disabled


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if os.environ.get("RONAN_FAST_CPU_HEAP", "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL("libc.so.6")
                lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc = lib
            except (OSError, AttributeError):
                _libc = None
    return _libc


def active() -> bool:
    """Whether some inversion holds the heap's freed memory right now."""
    return _users > 0


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Hold freed heap memory for reuse while the block runs; yields whether it does (glibc, not disabled)."""
    global _users
    lib = _glibc()
    if lib is None:
        yield False
        return
    with _lock:
        if _users == 0:
            # both: setting either one stops glibc from adjusting the other dynamically
            lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            lib.mallopt(_M_TRIM_THRESHOLD, TRIM_WHILE_ACTIVE)
        _users += 1
    try:
        yield True
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                lib.mallopt(_M_TRIM_THRESHOLD, TRIM_AFTER)
                lib.malloc_trim(0)
