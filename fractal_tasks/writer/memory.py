"""Keep the task's resident memory at what it actually uses (glibc only)."""

import ctypes
import functools
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 128 * 2**10  # glibc's own starting value


@functools.cache
def return_freed_memory() -> bool:
    """Make glibc hand freed image buffers back to the system at once.

    glibc raises its mmap threshold each time a large buffer is freed; from
    then on chunk-sized buffers come from per-thread heaps that fragment and
    are kept, and the apply task's peak RSS grew ~50% above the memory really
    in use (more with every image). Fixing both thresholds at glibc's starting
    value, as dask does for its workers with ``MALLOC_TRIM_THRESHOLD_``, keeps
    large buffers in their own mappings, released when freed; the cost is a
    page fault per page of each new buffer, which the writer mostly avoids by
    reusing its chunk buffers (``buffers.BufferPool``).

    This is process-wide and lasts for the process, so only the task's
    executable calls it (Fractal runs each task in a process of its own); the
    task function, called from a scientist's Python session, does not. Returns
    False, changing nothing, outside glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # e.g. musl
        return False
    ok = all(
        mallopt(option, _THRESHOLD) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
    )
    logger.debug("glibc mmap and trim thresholds fixed at %d bytes: %s", _THRESHOLD, ok)
    return ok
