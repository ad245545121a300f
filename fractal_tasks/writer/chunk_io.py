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

import gzip
import lzma
import mmap
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

from fractal_tasks.hcs.errors import RegistrationInputError

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
# What decoders raise on bytes that are not a valid chunk (blosc, zstd, lz4:
# RuntimeError or ValueError; gzip: EOFError or BadGzipFile; zlib; lzma), and
# zarr on a chunk of the wrong size (ValueError). Not OSError as a whole: a
# PermissionError is not about the data.
_UNDECODABLE = (
    RuntimeError,
    ValueError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    lzma.LZMAError,
)


def grid_region(
    index: Index, size: Sequence[int], shape: Sequence[int]
) -> tuple[slice, ...]:
    """Slices of cell ``index`` of a grid of ``size`` cells over ``shape``.

    Cells at the far edges are cut to the array.
    """
    return tuple(
        slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, size, shape)
    )


def corrupt_chunk(file: str | Path, problem: str) -> RegistrationInputError:
    """The error for a chunk file that does not hold a valid chunk."""
    return RegistrationInputError(
        f"Chunk file {str(file)!r} {problem}: the image is corrupt (e.g. a copy "
        "or a conversion that was cut off). Re-create or re-convert the image."
    )


def chunk_file(array: zarr.Array, index: Index) -> str:
    """Where chunk (or shard) ``index`` of ``array`` is stored, for messages."""
    key = "/".join(
        part
        for part in (array.store_path.path, array.metadata.encode_chunk_key(index))
        if part
    )
    store = array.store_path.store
    if isinstance(store, LocalStore):
        return str(Path(store.root, key))
    return f"{store}/{key}"


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

        Raises:
            RegistrationInputError: If zarr cannot decode the chunk's file.
        """
        region = self.region(index)
        try:
            data = np.asarray(self.array[region])
        except _UNDECODABLE as error:
            raise corrupt_chunk(
                chunk_file(self.array, index), f"cannot be decoded ({error})"
            ) from error
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
        """As ``ChunkAccess.read``, decoded straight from the chunk's file.

        Raises:
            RegistrationInputError: If the file is not one whole chunk: raw
                bytes of another length, or bytes the codec cannot decode or
                that decode to another length. Nothing is written then.
        """
        chunk = np.empty(self.chunks, self.dtype) if out is None else out
        path = self._path(index)
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            chunk.fill(self._fill)
            return self._crop(index, chunk)
        with file:
            size = os.fstat(file.fileno()).st_size
            if self._codec is None:
                if size != chunk.nbytes:
                    raise corrupt_chunk(
                        path,
                        f"has {size} bytes, an uncompressed chunk has {chunk.nbytes}",
                    )
                file.readinto(chunk.reshape(-1).view(np.uint8).data)
            elif size == 0:
                raise corrupt_chunk(path, "is empty")
            else:
                # Decoded from the page cache in place: no copy of the bytes.
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    try:
                        _decode(self._codec, data, chunk)
                    except _UNDECODABLE as error:
                        raise corrupt_chunk(
                            path, f"cannot be decoded ({error})"
                        ) from error
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


def _decode(codec: numcodecs.abc.Codec, data, out: np.ndarray) -> None:
    """Decode ``data`` into ``out``, which it must fill exactly.

    Decoders write into ``out`` without saying how much they wrote, so a chunk
    that decodes short would leave stale bytes. Blosc and zstd headers state
    the decoded size: when it is ``out``'s, decoding in place is safe. Any
    other codec (or size) decodes into a new buffer that is measured first.

    Raises:
        ValueError: If the chunk decodes to another size than ``out``.
    """
    if _declared_size(codec, data) == out.nbytes:
        codec.decode(data, out=out)
        return
    decoded = np.frombuffer(codec.decode(data), np.uint8)
    if decoded.nbytes != out.nbytes:
        raise ValueError(f"{decoded.nbytes} bytes decoded, a chunk has {out.nbytes}")
    out.reshape(-1).view(np.uint8)[:] = decoded


def _declared_size(codec: numcodecs.abc.Codec, data) -> int | None:
    """The decoded size a blosc or zstd header states (None: none found).

    Raises:
        ValueError: If a blosc chunk is not as long as its header states.
    """
    if isinstance(codec, numcodecs.Blosc):
        # A 16-byte header: decoded size at bytes 4-8, stored size at 12-16
        # (little-endian). Blosc itself does not check the latter: a cut-off
        # file of an incompressible chunk would decode with garbage at its end.
        if len(data) < 16 or int.from_bytes(data[12:16], "little") != len(data):
            raise ValueError(f"{len(data)} bytes, not the size blosc's header states")
        return int.from_bytes(data[4:8], "little")
    if isinstance(codec, numcodecs.Zstd):
        return _zstd_content_size(bytes(data[:18]))
    return None


def _zstd_content_size(header: bytes) -> int | None:
    """The frame content size of a zstd frame header (RFC 8878, 3.1.1.1)."""
    if len(header) < 6 or header[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = header[4]
    single_segment = descriptor >> 5 & 1
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    field = header[start : start + width]
    if width == 0 or len(field) < width:
        return None
    size = int.from_bytes(field, "little")
    return size + 256 if width == 2 else size


def chunk_access(array: zarr.Array) -> ChunkAccess:
    """The fastest whole-chunk access that reproduces zarr's layout exactly.

    Always zarr's own path (``ChunkAccess``) if ``FRACTAL_TASKS_ZARR_IO`` is
    set to anything but ``""`` or ``"0"``; read on every call.
    """
    if os.environ.get(ZARR_IO_ENV, "") not in ("", "0"):
        return ChunkAccess(array)
    direct, codec = direct_codec(array)
    return ChunkFiles(array, codec) if direct else ChunkAccess(array)


def direct_codec(array: zarr.Array) -> tuple[bool, numcodecs.abc.Codec | None]:
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
