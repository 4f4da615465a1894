"""Keep freed memory in the process instead of handing it back to the operating system.

glibc's ``malloc`` serves large blocks with fresh ``mmap`` pages (or trims the top of its heap)
and returns them to the system when freed; the next tensor of that size then faults every page
in again. On the CPU, where a training iteration or a batch-64 decode allocates tens of MB of
temporaries, those page faults cost about as much as the arithmetic (BENCHMARKS.md). :func:`retain_freed_memory` raises the two glibc thresholds once, at
the start of the scripts, so freed blocks stay in the heap for reuse. The process's memory then
stays near its peak instead of shrinking between iterations (the peak itself is unchanged).

It does nothing on other C libraries, or when the user has set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables (theirs win), or
``DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS=1``.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h) and the values set: blocks up to 32 MiB (glibc's largest allowed
# threshold on 64-bit systems) come from the heap, and up to 1 GiB of free heap top is kept.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

_OPT_OUT = "DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS"
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring). Returns True when they
    were set, False when this is not glibc or the environment asks to leave them alone."""
    if os.environ.get(_OPT_OUT, "") not in ("", "0") or any(v in os.environ for v in _GLIBC_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
