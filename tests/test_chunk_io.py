"""Whole-chunk access: chunk files written directly must read back through zarr."""

import re
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.writer.buffers import BufferPool
from fractal_tasks.writer.chunk_io import (
    ZARR_IO_ENV,
    ChunkAccess,
    ChunkFiles,
    chunk_access,
    chunk_file,
)

SHAPE, CHUNKS = (3, 21, 34), (2, 8, 10)

V2 = {"zarr_format": 2}
LAYOUTS = {
    "v2-blosc": (dict(V2, compressors=numcodecs.Blosc("lz4", 5, 1)), ChunkFiles),
    "v2-zstd-flat-keys": (
        dict(
            V2,
            compressors=numcodecs.Zstd(3),
            chunk_key_encoding={"name": "v2", "separator": "."},
        ),
        ChunkFiles,
    ),
    "v2-raw": (dict(V2, compressors=None), ChunkFiles),
    "v2-big-endian": (dict(V2, dtype=">u2"), ChunkAccess),
    "v3-zstd": ({"compressors": ZstdCodec(level=1)}, ChunkFiles),
    "v3-blosc-bitshuffle": (
        {"compressors": BloscCodec(cname="zstd", shuffle="bitshuffle")},
        ChunkFiles,
    ),
    "v3-gzip": ({"compressors": GzipCodec(level=2)}, ChunkFiles),
    "v3-raw": ({"compressors": None}, ChunkFiles),
    "v3-sharded": ({"shards": (2, 16, 20)}, ChunkAccess),
    "v3-two-compressors": (
        {"compressors": [ZstdCodec(), Crc32cCodec()]},
        ChunkAccess,
    ),
}


def _array(path, layout: str) -> zarr.Array:
    kwargs = {"dtype": "uint16", **LAYOUTS[layout][0]}
    return zarr.create_array(path, shape=SHAPE, chunks=CHUNKS, fill_value=7, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_written_chunks_read_back_through_zarr(tmp_path, layout):
    array = _array(tmp_path / "a", layout)
    access = chunk_access(array)
    assert type(access) is LAYOUTS[layout][1]
    data = np.random.default_rng(0).integers(0, 60000, SHAPE, dtype=np.uint16)
    counts = [-(-n // c) for n, c in zip(SHAPE, access.chunks)]  # shards if any
    skipped = (0, 1, 1)  # one chunk never written: reads as the fill value
    last = tuple(n - 1 for n in counts)  # cut by the far edges
    want = data.copy()
    want[access.region(skipped)] = 7
    for index in np.ndindex(*counts):
        if index != skipped:
            access.write(index, data[access.region(index)])
    reopened = zarr.open_array(tmp_path / "a", mode="r")
    np.testing.assert_array_equal(reopened[:], want)
    for index in [(0, 0, 0), last, skipped]:
        reader = chunk_access(reopened)
        into = np.full(reader.chunks, 99, np.uint16)  # a reused, dirty buffer
        for got in (reader.read(index), reader.read(index, out=into)):
            np.testing.assert_array_equal(got, want[access.region(index)])


@pytest.mark.parametrize("value, kind", [("1", ChunkAccess), ("0", ChunkFiles)])
def test_env_switch_forces_the_zarr_path(tmp_path, monkeypatch, value, kind):
    monkeypatch.setenv(ZARR_IO_ENV, value)
    assert type(chunk_access(_array(tmp_path / "a", "v2-blosc"))) is kind


def test_chunk_files_read_what_zarr_wrote(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    for layout in ("v2-blosc", "v3-zstd", "v3-blosc-bitshuffle"):
        array = _array(tmp_path / layout, layout)
        array[:] = data
        access = chunk_access(array)
        assert isinstance(access, ChunkFiles)
        for index in [(0, 0, 0), (1, 2, 3)]:
            np.testing.assert_array_equal(
                access.read(index), data[access.region(index)]
            )


def test_pool_reuses_given_back_memory_within_its_limit():
    pool = BufferPool(limit=2 * 160)
    first = pool.take((8, 10), np.uint16)  # 160 bytes
    pool.give(first[2:, 3:])  # any view gives back the whole buffer
    again = pool.take((160,), np.uint8)  # same size in bytes: same memory
    assert again.ctypes.data == first.ctypes.data
    others = [pool.take((8, 10), np.uint16) for _ in range(3)]
    for buffer in others:
        pool.give(buffer)  # the third is over the limit: dropped
    reused = {pool.take((8, 10), np.uint16).ctypes.data for _ in range(3)}
    assert len(reused & {b.ctypes.data for b in others}) == 2
    dirty = pool.take((8, 10), np.uint16)
    dirty.fill(5)
    pool.give(dirty)
    assert not pool.take((8, 10), np.uint16, zero=True).any()  # reused, cleared
    assert not pool.take((8, 10), np.uint16, zero=True).any()  # new
    with pytest.raises(ValueError, match="Not an array of this pool"):
        pool.give(np.zeros(4, np.uint16))


def _corrupt(path, how: str) -> None:
    """Damage a chunk file as a cut-off copy or a faulty converter would."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":  # same length, not the codec's bytes
        path.write_bytes(
            bytes(range(256)) * (len(data) // 256) + b"x" * (len(data) % 256)
        )


CORRUPTIONS = ["truncated", "empty", "garbage"]
# what zarr 3.1 itself reads without an error (our chunk files do not)
ZARR_MISSES = {
    ("v2-blosc", "truncated"): "blosc does not check the stored size: garbage",
    ("v3-blosc-bitshuffle", "truncated"): "the same, in zarr v3",
    ("v3-sharded", "empty"): "an empty shard file reads as the fill value",
}


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("zarr_io", [False, True])
def test_a_corrupt_chunk_file_is_named(
    request, tmp_path, monkeypatch, layout, how, zarr_io
):
    if how == "garbage" and "raw" in layout:
        pytest.skip("raw bytes of the right length are a valid chunk")
    through_zarr = zarr_io or LAYOUTS[layout][1] is ChunkAccess
    if through_zarr and (layout, how) in ZARR_MISSES:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=ZARR_MISSES[layout, how])
        )
    array = _array(tmp_path / "a", layout)
    data = np.random.default_rng(0).integers(0, 60000, SHAPE, dtype=np.uint16)
    array[:] = data
    file = Path(chunk_file(array, (0, 0, 0)))
    assert file.is_file()
    _corrupt(file, how)
    if zarr_io:
        monkeypatch.setenv(ZARR_IO_ENV, "1")
    reader = chunk_access(zarr.open_array(tmp_path / "a", mode="r"))
    with pytest.raises(RegistrationInputError, match=re.escape(repr(str(file)))) as e:
        reader.read((0, 0, 0))
    assert "Re-create or re-convert the image" in str(e.value)
    np.testing.assert_array_equal(
        reader.read((1, 1, 1)), data[reader.region((1, 1, 1))]
    )


@pytest.mark.parametrize(
    "codec",
    [
        numcodecs.Blosc("lz4", 5, 1),
        numcodecs.Zstd(3),
        numcodecs.GZip(1),
        numcodecs.Zlib(1),
        numcodecs.LZ4(),
    ],
    ids=lambda c: c.codec_id,
)
@pytest.mark.parametrize("zarr_io", [False, True])
def test_a_chunk_that_decodes_short_is_named(tmp_path, monkeypatch, codec, zarr_io):
    # valid bytes of the codec, but of half a chunk: decoders fill `out` partly
    array = zarr.create_array(
        tmp_path / "b",
        shape=SHAPE,
        chunks=CHUNKS,
        dtype="uint16",
        fill_value=7,
        zarr_format=2,
        compressors=codec,
    )
    array[:] = 1
    file = Path(chunk_file(array, (0, 0, 0)))
    file.write_bytes(bytes(codec.encode(np.full(np.prod(CHUNKS) // 2, 2, "u2"))))
    if zarr_io:
        monkeypatch.setenv(ZARR_IO_ENV, "1")
    reader = chunk_access(zarr.open_array(tmp_path / "b", mode="r"))
    into = np.zeros(reader.chunks, np.uint16)
    with pytest.raises(RegistrationInputError, match=re.escape(repr(str(file)))):
        reader.read((0, 0, 0), out=into)
