"""Keep freed memory in the process for reuse (glibc's malloc, Linux).

A model step allocates and frees the same few-MB tensors again and again. Left alone,
glibc serves such blocks with mmap and gives them back on free, so every step pays page
faults on fresh pages (on the built-in model: ~20% of a batched step).
Raising the mmap and trim thresholds keeps those blocks in the heap. Does nothing where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Returns whether glibc accepted both settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, min(threshold_bytes, 32 * 1024 * 1024)))
    ok = bool(mallopt(M_TRIM_THRESHOLD, threshold_bytes)) and ok
    if not ok:
        log.debug("mallopt refused the thresholds; memory is returned to the OS eagerly")
    return ok
