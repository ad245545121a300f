"""Read and write whole chunks of a zarr array, in the calling thread.

zarr-python 3 sends every read and write through its single event-loop thread
and copies each chunk several times on the way, which for the writer's
whole-chunk traffic costs about twice the codec time and leaves the memory
allocator with many short-lived buffers to scatter over its arenas. For the
arrays OME-Zarr writers produce on a local disk (zarr v2 with at most one
numcodecs compressor; zarr v3 with the ``bytes`` codec and at most one of
``blosc``, ``zstd`` or ``gzip``; no sharding, no filters, C order, little or
native byte order), ``chunk_access`` returns ``ChunkFiles``: the chunk's file
is read or written directly and decoded or encoded with numcodecs, exactly as
zarr lays it out. Any other array gets ``ChunkAccess``, which goes through
zarr itself; both give the same arrays on disk.

Setting the environment variable ``FRACTAL_TASKS_ZARR_IO=1`` makes
``chunk_access`` always return ``ChunkAccess``, so that when a user reports a
problem our bytes can be told from zarr's bytes. zarr then uses whatever codec
pipeline its own configuration names (e.g. ``ZARR_CODEC_PIPELINE__PATH``).
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

Index = tuple[int, ...]

# zarr v3 compressors and the attribute where zarr keeps the numcodecs object
# it codes their chunks with (private, hence the pinned zarr and the CI job
# that runs the chunk-file tests against the newest zarr)
_NUMCODECS_OF = {
    BloscCodec: "_blosc_codec",
    ZstdCodec: "_zstd_codec",
    GzipCodec: "_gzip_codec",
}
_BYTE_ORDER = {"little": "<", "big": ">"}
ZARR_IO_ENV = "FRACTAL_TASKS_ZARR_IO"


def grid_region(
    index: Index, size: Sequence[int], shape: Sequence[int]
) -> tuple[slice, ...]:
    """Slices of cell ``index`` of a grid of ``size`` cells over ``shape``.

    Cells at the far edges are cut to the array.
    """
    return tuple(
        slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, size, shape)
    )


def storage_chunks(array: zarr.Array) -> tuple[int, ...]:
    """The array's unit of storage: its shard if sharded, else its chunk.

    Two threads writing parts of one shard would each rewrite the whole shard,
    so writers must split work at these edges.
    """
    return tuple(array.shards or array.chunks)


class ChunkAccess:
    """Whole-chunk reads and writes through zarr (works for every array).

    For a sharded array a "chunk" here is a whole shard (see storage_chunks).
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunks: tuple[int, ...] = storage_chunks(array)
        self.dtype = np.dtype(array.dtype)

    def region(self, index: Index) -> tuple[slice, ...]:
        """The chunk's slices in the array, cut at the array's far edges."""
        return grid_region(index, self.chunks, self.shape)

    def _crop(self, index: Index, chunk: np.ndarray) -> np.ndarray:
        """The part of a full-chunk-shaped ``chunk`` that lies in the array."""
        return chunk[tuple(slice(0, r.stop - r.start) for r in self.region(index))]

    def read(self, index: Index, out: np.ndarray | None = None) -> np.ndarray:
        """The chunk's pixels (fill value where never written), edge-cropped.

        With ``out`` (C-contiguous, of the full chunk shape and the array's
        dtype) the pixels go there and a view of it is returned.
        """
        data = np.asarray(self.array[self.region(index)])
        if out is None:
            return data
        view = self._crop(index, out)
        view[...] = data
        return view

    def write(self, index: Index, block: np.ndarray) -> None:
        """Store ``block``, shaped like the (edge-cropped) chunk ``index``."""
        self.array[self.region(index)] = block


class ChunkFiles(ChunkAccess):
    """Whole-chunk reads and writes on the chunk files of a local array."""

    def __init__(self, array: zarr.Array, codec: numcodecs.abc.Codec | None):
        super().__init__(array)
        store = array.store_path.store
        if not isinstance(store, LocalStore):
            raise TypeError(f"Chunk files need a local store, not {store!r}.")
        self._root = Path(store.root, array.store_path.path)
        self._key = array.metadata.encode_chunk_key
        self._codec = codec
        self._fill = array.fill_value
        self._made: set[Path] = set()

    def _path(self, index: Index) -> Path:
        return self._root / self._key(index)

    def read(self, index: Index, out: np.ndarray | None = None) -> np.ndarray:
        """As ``ChunkAccess.read``, decoded straight from the chunk's file."""
        chunk = np.empty(self.chunks, self.dtype) if out is None else out
        try:
            file = open(self._path(index), "rb")
        except FileNotFoundError:
            chunk.fill(self._fill)
            return self._crop(index, chunk)
        with file:
            if self._codec is None:
                file.readinto(chunk.reshape(-1).view(np.uint8).data)
            else:
                # Decoded from the page cache in place: no copy of the bytes.
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    self._codec.decode(data, out=chunk)
        return self._crop(index, chunk)

    def write(self, index: Index, block: np.ndarray) -> None:
        """As ``ChunkAccess.write``, encoded straight into the chunk's file."""
        if block.shape != self.chunks:  # edge chunk: stored whole, padded
            full = np.full(self.chunks, self._fill, self.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        block = np.ascontiguousarray(block, self.dtype)
        data = block.tobytes() if self._codec is None else self._codec.encode(block)
        path = self._path(index)
        if path.parent not in self._made:
            os.makedirs(path.parent, exist_ok=True)
            self._made.add(path.parent)
        with open(path, "wb") as file:
            file.write(data)


def chunk_access(array: zarr.Array) -> ChunkAccess:
    """The fastest whole-chunk access that reproduces zarr's layout exactly.

    Always zarr's own path (``ChunkAccess``) if ``FRACTAL_TASKS_ZARR_IO`` is
    set to anything but ``""`` or ``"0"``; read on every call.
    """
    if os.environ.get(ZARR_IO_ENV, "") not in ("", "0"):
        return ChunkAccess(array)
    direct, codec = _direct_codec(array)
    return ChunkFiles(array, codec) if direct else ChunkAccess(array)


def _direct_codec(array: zarr.Array) -> tuple[bool, numcodecs.abc.Codec | None]:
    """Whether chunk files can be used, and the numcodecs codec (None: raw).

    Not for arrays that need zarr itself: a remote store, sharding, filters,
    Fortran order, a non-native byte order, no fill value, or an unknown codec.
    """
    meta = array.metadata
    native = sys.byteorder
    unsupported = (False, None)
    if not isinstance(array.store_path.store, LocalStore):
        return unsupported
    if array.fill_value is None or np.dtype(array.dtype).hasobject:
        return unsupported
    if meta.zarr_format == 2:
        byte_order = meta.dtype.to_native_dtype().byteorder
        if (
            meta.filters
            or meta.order != "C"
            or byte_order not in "=|" + _BYTE_ORDER[native]
        ):
            return unsupported
        return True, meta.compressor
    if array.shards is not None or array.filters or array.order != "C":
        return unsupported
    serializer = array.serializer
    endian = getattr(serializer, "endian", None)
    if not isinstance(serializer, BytesCodec) or getattr(
        endian, "value", endian
    ) not in (None, native):
        return unsupported
    compressors = array.compressors
    if not compressors:
        return True, None
    codec = _numcodecs_of(compressors[0])
    if len(compressors) > 1 or codec is None:
        return unsupported
    return True, codec


def _numcodecs_of(codec) -> numcodecs.abc.Codec | None:
    """The numcodecs object zarr codes a v3 compressor with, or None if unknown."""
    attribute = _NUMCODECS_OF.get(type(codec))
    if attribute is None or getattr(codec, "typesize", 1) is None:
        return None  # a Blosc codec not yet fitted to the array's dtype
    return getattr(codec, attribute)
