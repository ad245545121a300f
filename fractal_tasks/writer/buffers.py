"""Chunk-sized buffers handed from one use to the next.

Fresh memory costs a page fault per page (on a virtual machine, about a
millisecond per MiB: as much as compressing it), and freed buffers of these
sizes are handed straight back to the system (see ``memory``). A
``BufferPool`` keeps a few freed chunk-sized buffers for the next decode,
unit or pyramid chunk, so that memory is reused without growing: it keeps no
more than ``limit`` bytes idle.
"""

from __future__ import annotations

import math
import threading

import numpy as np


class BufferPool:
    """Arrays to ``take`` and ``give`` back, reused while at most ``limit`` bytes idle.

    Only arrays from ``take`` may be given back (any view of one gives back
    the whole buffer), and only once nothing reads or writes them any more.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._lock = threading.Lock()
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0

    def take(self, shape, dtype, *, zero: bool = False) -> np.ndarray:
        """A C-contiguous array, on a given-back buffer if one fits.

        Uninitialised unless ``zero``. A new zeroed buffer is left to the
        system to zero page by page as it is written, so the parts never
        written cost no memory.
        """
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            idle = self._idle.get(nbytes)
            flat = idle.pop() if idle else None
            if flat is not None:
                self._idle_bytes -= nbytes
        if flat is None:
            flat = (np.zeros if zero else np.empty)(nbytes, np.uint8)
        elif zero:
            flat.fill(0)
        return flat.view(dtype).reshape(shape)

    def give(self, array: np.ndarray | None) -> None:
        """Return an array from ``take`` (None: nothing to return)."""
        if array is None:
            return
        flat = array if array.base is None else array.base
        if not isinstance(flat, np.ndarray) or flat.dtype != np.uint8:
            raise ValueError("Not an array of this pool.")
        with self._lock:
            if self._idle_bytes + flat.nbytes <= self._limit:
                self._idle.setdefault(flat.nbytes, []).append(flat)
                self._idle_bytes += flat.nbytes
