"""glibc malloc settings for the engine's many chunk-sized temporaries (Linux; elsewhere no-ops).

The engine allocates and frees a few MiB of float32 per unit, thousands of times per merge. With
glibc's defaults those buffers either fault fresh pages in every time or pile up in per-thread
arenas; both cost the engine several times its speed or its memory. `tune_malloc` is called once
per merge, `trim_malloc` every TRIM_EVERY_BYTES of input read.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource

TRIM_EVERY_BYTES = 512 << 20  # input bytes between malloc_trim calls


def tune_malloc() -> None:
    """Tune glibc malloc for the engine's many chunk-sized temporaries (Linux only; else a no-op).

    - A fixed 32 MiB mmap threshold (glibc's maximum): by default glibc raises it after each
      large free, and the chunk buffers then live in per-thread arenas that never shrink. Below
      it, a unit's buffers come from the arenas and are reused; at 4 MiB the (n + 1, 256 Ki)
      float32 copy of a unit (4 MiB for 3 models) was a fresh mapping every time, and its page
      faults made the bf16 -> float32 conversion 25x slower (8 ms instead of 0.3 ms per unit).
    - A 256 MiB trim threshold: with the default (128 KiB once the mmap threshold is fixed) every
      free at the top of the heap hands the pages back, and the next temporary faults them in
      again: an (n, 256Ki) float32 result cost 1.8 ms instead of 0.1 ms measured here (18x),
      which made TIES's merge pass 3-4x slower. `trim_malloc` bounds the heap instead.
    - Two shared arenas, so resident memory does not grow with the number of threads.
    """
    libc = glibc()
    if libc is None:
        return
    try:
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_arena_max, 2)
    except AttributeError:
        pass


def trim_malloc() -> None:
    """Give free arena memory back to the OS (glibc malloc_trim; elsewhere a no-op).

    Unit temporaries live in malloc's arenas (below the mmap threshold), where long-lived small
    buffers (TIES's kept candidate values) fragment them and resident memory grows. Trimming
    every TRIM_EVERY_BYTES of input bounds it: at 0.5B TIES/global peaked at 2.9 GiB without,
    1.3 GiB with, for a few seconds of page faults.
    """
    libc = glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, loaded once (None where there is no glibc)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux
