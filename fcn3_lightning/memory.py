"""glibc malloc tuning for the block loop (:func:`keep_freed_memory`, :func:`release_memory`) and the process's
resident size (:func:`rss_mb`): why it pays is in :func:`keep_freed_memory`. All of it is a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any


def _libc() -> Any:
    """glibc, or None where the process does not run on it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> None:
    """Make glibc's malloc serve and keep block-sized buffers (up to 1 GB) in the heap instead of fresh mmaps.

    Every block allocates and frees the same few 10-100 MB temporaries; glibc maps each one anew (its mmap
    threshold stops adapting at 32 MB) and the kernel zero-fills every page on first touch, which doubled the
    scoring time. The heap then fragments over the run (buffers are freed by other threads than the ones that
    allocated them): :func:`release_memory` hands free pages back whenever the process grows past its budget.
    Process-wide and permanent (the CLI process ends with the run); a no-op off glibc.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the kernel (malloc_trim): for a loop whose temporaries are freed between
    long-lived small allocations, so that the resident size follows what is live, not the heap's fragmented extent."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory(limit_mb: float) -> None:
    """malloc_trim when the resident size passes ``limit_mb`` (glibc keeps freed, fragmented heap pages)."""
    if rss_mb() > limit_mb:
        trim_heap()
