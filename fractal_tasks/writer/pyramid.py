"""Stream registered windows into a new pyramid, chunk by chunk, in flat memory.

The new image starts empty (unwritten chunks read as zero). Level 0 is built in
*units*: one or a few whole chunks, so no two writers ever share a chunk, and a
unit that no window touches is never written. Each unit reads its windows from
decoded source chunks kept in a small shared cache (bounded in bytes; a chunk is
dropped as soon as no later unit needs it), so every source chunk is decoded
about once even when the windows are not chunk-aligned.

Coarser levels are built from data still in memory: each unit is reduced into
the chunk of the level below that contains it; when that chunk has received all
its parts it is written, and reduced in turn into the next level. Units are
visited in Z order (Morton order) over the downsampled axes, so only a few
chunks per level are ever incomplete, whatever the size of the well. Levels
whose chunks do not line up with the level above are computed afterwards from
the level above, read back tile by tile.

A rotated window is resampled rather than copied: each unit reads the source
region that the inverse-mapped part of the window covers (a little wider than
the part, whatever the size of the well) and interpolates it plane by plane.

Chunks are read and written whole through ``chunk_io`` (the chunk files
themselves where the layout allows), and chunk-sized buffers are passed from
one use to the next through a small ``BufferPool`` rather than allocated anew.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zarr
from scipy import ndimage

from fractal_tasks.geometry import Box, RigidTransform
from fractal_tasks.writer.buffers import BufferPool
from fractal_tasks.writer.chunk_io import (
    ChunkAccess,
    chunk_access,
    grid_region,
    storage_chunks,
)

logger = logging.getLogger(__name__)

Aggregation = Literal["mean", "nearest"]
TILE_BYTES = 32 * 2**20  # upper bound of one read-back tile in memory
UNIT_BYTES = 4 * 2**20  # level-0 units grow (by whole chunks) up to this size
CACHE_BYTES = 32 * 2**20  # decoded source chunks kept for later units
POOL_BYTES = 8 * 2**20  # freed chunk buffers kept idle for reuse
# Interpolation order per aggregation: linear for intensities, nearest
# neighbour for labels (which keeps their values and invents none).
ORDER = {"mean": 1, "nearest": 0}
# Source pixels read beyond the inverse-mapped corners of a rotated part, on
# each side: every sample then lies strictly inside the region read, so
# cutting the region out of the array changes no sample.
_MARGIN = 1

Index = tuple[int, ...]
Region = tuple[slice, ...]


@dataclass(frozen=True)
class WindowPair:
    """Fill ``target`` (reference pixels) from ``source`` (acquisition pixels).

    Without ``transform``, or with a pure translation, the target is a copy of
    the source box, pixel for pixel (both have the same shape). With a
    rotation, target pixel ``i`` (over the box's axes) takes the source at
    the continuous (y, x) point ``transform.inverse_yx(i_yx + 0.5)``
    (interpolated), and at ``i - shift`` along every other axis of the box,
    ``shift`` being the transform's whole-pixel translation there; the
    source box is then informative only. The transform is in this array's
    pixels.
    """

    source: Box
    target: Box
    transform: RigidTransform | None = None

    @property
    def rotates(self) -> bool:
        """True when the target is resampled rather than copied."""
        return self.transform is not None and not self.transform.is_translation


def downsample(
    block: np.ndarray, factors: Sequence[int], kind: Aggregation
) -> np.ndarray:
    """Reduce ``block`` by integer ``factors`` per axis.

    ``mean`` averages each factor-sized cell, for intensities; integer dtypes
    are rounded to the nearest integer, halves to even (as ``np.rint``), so a
    2x2 mean of ``1, 2, 3, 4`` gives 2 and of ``3, 4, 5, 6`` gives 4.
    ``nearest`` keeps the first pixel of each cell, so label values are
    preserved exactly. An axis whose length is not a multiple of its factor is
    padded by repeating its last pixel.
    """
    out = np.empty([-(-n // f) for n, f in zip(block.shape, factors)], block.dtype)
    downsample_into(block, factors, kind, out)
    return out


def downsample_into(
    block: np.ndarray, factors: Sequence[int], kind: Aggregation, out: np.ndarray
) -> None:
    """Write ``downsample(block, factors, kind)``, cut to ``out``'s shape, to ``out``.

    Reads only the part of ``block`` that ``out`` covers; integer means need
    one wide sum the size of ``out`` and a byte per pixel, no more.
    """
    block = block[tuple(slice(0, n * f) for n, f in zip(out.shape, factors))]
    pad = [(0, n * f - b) for n, f, b in zip(out.shape, factors, block.shape)]
    if any(after for _, after in pad):
        block = np.pad(block, pad, mode="edge")
    if kind == "nearest" or all(f == 1 for f in factors):
        np.copyto(out, block[tuple(slice(None, None, f) for f in factors)])
        return
    cells = math.prod(factors)
    wide = _exact_sum_dtype(block.dtype, cells)
    if wide is not None:
        _integer_mean(block, factors, cells, wide, out)
        return
    split = []
    for n, f in zip(block.shape, factors):
        split += [n // f, f]
    mean = block.reshape(split).mean(axis=tuple(range(1, 2 * block.ndim, 2)))
    if np.issubdtype(block.dtype, np.integer):
        mean = np.rint(mean)
    np.copyto(out, mean, casting="unsafe")


def _exact_sum_dtype(dtype: np.dtype, cells: int) -> np.dtype | None:
    """An integer dtype that holds the sum of ``cells`` values exactly, if any.

    Only for power-of-two cells, where the rounded mean is an exact shift.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui" or cells & (cells - 1) or dtype.itemsize > 4:
        return None
    bits = dtype.itemsize * 8 + cells.bit_length()
    if bits <= 32:
        return np.dtype(np.int32 if dtype.kind == "i" or bits == 32 else np.uint32)
    return np.dtype(np.int64)


def _integer_mean(
    block: np.ndarray,
    factors: Sequence[int],
    cells: int,
    wide: np.dtype,
    out: np.ndarray,
) -> None:
    """The rounded mean of ``downsample``, with integer arithmetic only.

    With ``s`` the exact sum of ``n = 2**k`` values, ``q = s >> k`` and
    ``r = s - q * n``, ``np.rint(s / n)`` is ``q`` plus one when ``r > n / 2``,
    or ``r == n / 2`` and ``q`` is odd; that is
    ``(s + n / 2 - 1 + (q & 1)) >> k``.
    """
    shift = cells.bit_length() - 1
    parts = (
        block[tuple(slice(o, None, f) for o, f in zip(offsets, factors))]
        for offsets in itertools.product(*(range(f) for f in factors))
    )
    total = next(parts).astype(wide)
    for part in parts:
        total += part
    odd = np.empty(total.shape, np.uint8)
    np.right_shift(total, shift, out=odd, casting="unsafe")
    odd &= 1  # the low byte of q keeps its parity
    total += cells // 2 - 1
    total += odd
    del odd
    total >>= shift
    np.copyto(out, total, casting="unsafe")


def _tile_shape(array: zarr.Array, factors: Sequence[int]) -> tuple[int, ...]:
    """Whole chunks, times the downsampling factor, grown in y/x up to TILE_BYTES."""
    chunks = storage_chunks(array)
    return _grow(chunks, array.shape, factors, array.dtype, TILE_BYTES // 2)


def _grow(
    chunks: Sequence[int],
    shape: Sequence[int],
    factors: Sequence[int],
    dtype,
    limit: int,
    cap: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """``chunks * factors``, doubled along the last two axes while under ``limit``.

    An axis grows no further than ``cap`` (default: the array's extent). The
    result depends on the array's shape only where it reaches the array's
    extent, so memory stays flat as the array grows.
    """
    tile = [c * f for c, f in zip(chunks, factors)]
    cap = shape if cap is None else cap
    item = np.dtype(dtype).itemsize
    axes = [a for a in (len(tile) - 1, len(tile) - 2) if a >= 0]
    while True:
        grown = False
        for axis in axes:
            if tile[axis] >= shape[axis] or tile[axis] * 2 > cap[axis]:
                continue
            if math.prod(tile) * item * 2 > limit:
                return tuple(tile)
            tile[axis] *= 2
            grown = True
        if not grown:
            return tuple(tile)


def _tiles(shape: Sequence[int], tile: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Chunk-aligned tiles covering ``shape``, clipped at the far edges."""
    ranges = [range(0, n, t) for n, t in zip(shape, tile)]
    for origin in itertools.product(*ranges):
        yield tuple(slice(o, min(o + t, n)) for o, t, n in zip(origin, tile, shape))


def _run(jobs: Callable, tiles: Iterable, workers: int, what: str = "") -> None:
    """Run one job per tile on ``workers`` threads; re-raise the first error.

    With ``what``, progress is logged at the end and, on long runs, at every
    tenth of the tiles (at most every 5 s).
    """
    tiles = list(tiles)
    step = max(1, math.ceil(len(tiles) / 10))
    started = last = time.perf_counter()

    def report(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        final = done == len(tiles)
        if what and (final or (done % step == 0 and now - last >= 5.0)):
            last = now
            logger.info(
                "%s: %d/%d blocks (%d%%), %.1f s.",
                what,
                done,
                len(tiles),
                100 * done // len(tiles),
                now - started,
            )

    if workers <= 1:
        for done, tile in enumerate(tiles, 1):
            jobs(tile)
            report(done)
        return
    with ThreadPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(jobs, tiles), 1):
            report(done)


def _morton(index: Sequence[int]) -> int:
    """Z-order key of a grid index: interleave the bits of its coordinates."""
    key, bit, rest = 0, 0, list(index)
    while any(rest):
        for i, value in enumerate(rest):
            key |= (value & 1) << (bit + i)
            rest[i] = value >> 1
        bit += len(rest)
    return key


class _ChunkCache:
    """Decoded source chunks shared by threads, each decoded about once.

    ``uses`` counts, per chunk, the units still to read it; a chunk is dropped
    when that reaches zero, and least recently used chunks are dropped beyond
    ``limit`` bytes (and decoded again if a later unit needs them). A chunk
    dropped at zero uses has no reader left, so its buffer goes back to the
    pool.
    """

    def __init__(
        self,
        source: ChunkAccess,
        uses: dict[Index, int],
        limit: int,
        pool: BufferPool,
    ):
        self._source = source
        self._uses = uses
        self._limit = limit
        self._pool = pool
        self._lock = threading.Lock()
        self._entries: OrderedDict[Index, tuple[Future, np.ndarray]] = OrderedDict()
        self._bytes = math.prod(source.chunks) * source.dtype.itemsize

    def get(self, index: Index) -> np.ndarray:
        with self._lock:
            entry = self._entries.get(index)
            owner = entry is None
            if entry is None:
                buffer = self._pool.take(self._source.chunks, self._source.dtype)
                entry = self._entries[index] = (Future(), buffer)
                while len(self._entries) * self._bytes > self._limit and (
                    len(self._entries) > 1
                ):
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(index)
        future, buffer = entry
        if owner:
            try:
                future.set_result(self._source.read(index, out=buffer))
            except BaseException as error:
                future.set_exception(error)
                with self._lock:
                    self._entries.pop(index, None)
                raise
        return future.result()

    def release(self, index: Index) -> None:
        with self._lock:
            self._uses[index] -= 1
            if self._uses[index] <= 0:
                del self._uses[index]
                future, buffer = self._entries.pop(index, (None, None))
                if future is not None and future.done() and not future.exception():
                    self._pool.give(buffer)


@dataclass(frozen=True)
class _Piece:
    """Part of one window: ``source`` region -> ``put`` slices of a unit block."""

    chunk: Index  # source chunk index
    read: Region  # inside that decoded chunk
    put: Region  # inside the unit's block


@dataclass(frozen=True, eq=False)
class _Resample:
    """Part of one rotated window: a source region, resampled into ``put``.

    Region index ``(y, x) = matrix @ (y, x) + offset`` of the block's pixel
    ``put`` start + ``(y, x)``, in index coordinates (pixel ``j``'s centre is
    ``j``); along every other axis, region index = put index + ``lead``.
    """

    parts: tuple[_Piece, ...]  # source chunks -> the region array they tile
    shape: Index  # of the region array (may be empty: all outside the source)
    put: Region  # inside the unit's block
    lead: Index  # per axis but y and x, in array order
    yx: tuple[int, int]  # where y and x are among the array's axes
    matrix: np.ndarray  # 2 x 2
    offset: np.ndarray  # 2


def _reads(piece: _Piece | _Resample) -> Iterator[tuple[Index, int]]:
    """The source chunks a piece reads, each with the pixels it takes there."""
    for part in piece.parts if isinstance(piece, _Resample) else (piece,):
        yield part.chunk, math.prod(s.stop - s.start for s in part.put)


@dataclass
class _OpenChunk:
    """A chunk of a lower level while its parts arrive."""

    buffer: np.ndarray | None = None  # None while every part was all zero
    received: int = 0  # parts reduced into it so far


class _Pyramid:
    """Accumulate each level's chunks from parts of the level above, then write.

    Level ``k`` (``k >= 1``) receives reduced blocks of level ``k - 1``; a chunk
    of level ``k`` is written once all its parts arrived (unless none of them
    held data: it then stays unwritten, i.e. zero), then reduced into level
    ``k + 1``. Exactly one thread completes each chunk, so each chunk has one
    writer.
    """

    def __init__(
        self,
        levels: Sequence[ChunkAccess],
        factors,
        unit: Sequence[int],
        kind: Aggregation,
        pool: BufferPool,
    ):
        self.levels = levels
        self._pool = pool
        self.factors = factors
        self.kind = kind
        self.units = [tuple(unit)] + [tuple(a.chunks) for a in levels[1:]]
        self._lock = threading.Lock()
        self._open: list[dict[Index, _OpenChunk]] = [{} for _ in levels]
        # per level below the first: parts expected per chunk, along each axis
        self._counts: list[list[list[int]]] = [[]] + [
            self._expected(k) for k in range(1, len(levels))
        ]

    def _expected(self, k: int) -> list[list[int]]:
        """Per axis, how many parts each chunk of level ``k`` receives."""
        counts = []
        above_unit, above_shape = self.units[k - 1], self.levels[k - 1].shape
        for axis in range(len(above_shape)):
            n_above = math.ceil(above_shape[axis] / above_unit[axis])
            n_here = math.ceil(self.levels[k].shape[axis] / self.units[k][axis])
            per = [0] * n_here
            for i in range(n_above):
                j = self._child(k, axis, i)
                if j < n_here:
                    per[j] += 1
            counts.append(per)
        return counts

    def _child(self, k: int, axis: int, i: int) -> int:
        start = i * self.units[k - 1][axis] // self.factors[k - 1][axis]
        return start // self.units[k][axis]

    @staticmethod
    def fusable(levels, factors, unit: Sequence[int]) -> int:
        """How many levels below level 0 can be built from blocks in memory."""
        above = tuple(unit)
        for k in range(1, len(levels)):
            n_above, n_here = levels[k - 1].shape, levels[k].shape
            here = levels[k].chunks
            for u, f, c, na, nh in zip(above, factors[k - 1], here, n_above, n_here):
                if u >= na:  # one block along this axis covers the whole level
                    if nh > c:
                        return k - 1
                    continue
                if u % f or c % (u // f):
                    return k - 1
            above = here
        return len(levels) - 1

    def add(self, k: int, index: Index, block: np.ndarray | None) -> None:
        """Give level ``k`` the block (``None``: all zero) of unit ``index`` above.

        Takes the block over (it is from the pool): it goes back as soon as it
        is reduced, before the chunks it completes are written and reduced.
        """
        while k < len(self.levels):
            shape = self.levels[k].shape
            child = tuple(self._child(k, a, i) for a, i in enumerate(index))
            if any(c * u >= n for c, u, n in zip(child, self.units[k], shape)):
                break  # falls beyond the (cropped) level
            region = grid_region(child, self.units[k], shape)
            done, buffer = self._deposit(k, index, child, region, block)
            self._pool.give(block)
            block = None
            if not done:
                return
            if buffer is not None and not buffer.any():
                self._pool.give(buffer)
                buffer = None  # all zero: leave the chunk unwritten
            if buffer is not None:
                self.levels[k].write(child, buffer)
            k, index, block = k + 1, child, buffer
        self._pool.give(block)

    def _deposit(
        self,
        k: int,
        index: Index,
        child: Index,
        region: Region,
        block: np.ndarray | None,
    ) -> tuple[bool, np.ndarray | None]:
        """Reduce ``block`` (unit ``index`` above) into chunk ``child`` of level ``k``.

        Returns whether that chunk is now complete, and then its data (``None``
        if every part was all zero).
        """
        with self._lock:
            entry = self._open[k].setdefault(child, _OpenChunk())
            if block is not None and entry.buffer is None:
                shape = [r.stop - r.start for r in region]
                entry.buffer = self._pool.take(shape, block.dtype, zero=True)
            buffer = entry.buffer
        if block is not None:  # parts of one chunk never overlap
            assert buffer is not None  # taken above for any part with data
            factors = self.factors[k - 1]
            put = []
            for i, u, f, r, n in zip(
                index, self.units[k - 1], factors, region, block.shape
            ):
                start = i * u // f - r.start
                put.append(slice(start, min(start - (-n // f), r.stop - r.start)))
            downsample_into(block, factors, self.kind, buffer[tuple(put)])
        expected = math.prod(c[j] for c, j in zip(self._counts[k], child))
        with self._lock:
            entry.received += 1
            if entry.received < expected:
                return False, None
            del self._open[k][child]
            return True, entry.buffer  # another thread may have brought the data


def write_windows(
    source: zarr.Array,
    levels: Sequence[zarr.Array],
    axes: Sequence[str],
    pairs: Sequence[WindowPair],
    factors: Sequence[Sequence[int]],
    *,
    kind: Aggregation,
    workers: int = 1,
) -> None:
    """Write the registered image: windows at level 0, then every coarser level.

    Args:
        source: The acquisition's level-0 array.
        levels: The new image's arrays, level 0 first, all empty; level 0 has
            the source's shape.
        axes: Axis names of the arrays, e.g. ``("c", "z", "y", "x")``.
        pairs: Windows to copy or resample (see ``WindowPair``), in level-0
            pixels over the spatial axes; where windows overlap, the later
            one wins.
        factors: Per level after the first, the integer factor per axis from
            the level above (e.g. ``(1, 1, 2, 2)``).
        kind: ``"mean"`` for intensities, ``"nearest"`` for labels.
        workers: Threads to use; each works on its own units.

    Raises:
        ValueError: If the source's shape is not level 0's, or a rotated
            window lacks the y or x axis.
    """
    if source.shape != levels[0].shape:
        raise ValueError(f"Shapes differ: {source.shape} vs {levels[0].shape}.")
    levels = [_eager(a) for a in list(levels)[: len(factors) + 1]]
    access = [chunk_access(a) for a in levels]
    target = access[0]
    # Reuse pays for the many small chunks; a big chunk's idle buffer would
    # only add to the peak.
    pool = BufferPool(POOL_BYTES)
    # Units of whole chunks; no larger than one chunk of level 1 (per factor),
    # so that each unit reduces into a single chunk of level 1.
    cap: Sequence[int] = target.shape
    if len(levels) > 1:
        cap = [
            max(c, c1 * f)
            for c, c1, f in zip(target.chunks, access[1].chunks, factors[0])
        ]
    unit = _grow(
        target.chunks,
        target.shape,
        [1] * len(target.shape),
        target.dtype,
        UNIT_BYTES,
        cap,
    )
    fused = _Pyramid.fusable(access, factors, unit)
    pyramid = _Pyramid(access[: fused + 1], factors, unit, kind, pool)
    reader = chunk_access(source)
    plan, full = _plan(reader.chunks, target.shape, axes, pairs, unit)
    uses: dict[Index, int] = {}
    for pieces in plan.values():
        for chunk in {chunk for p in pieces for chunk, _ in _reads(p)}:
            uses[chunk] = uses.get(chunk, 0) + 1
    cache = _ChunkCache(reader, uses, CACHE_BYTES, pool)
    interpolation = ORDER[kind]
    grid = [math.ceil(n / u) for n, u in zip(target.shape, unit)]
    scaled = [any(f[a] > 1 for f in factors) for a in range(len(target.shape))]

    def order(index: Index):
        outer = tuple(i for i, s in zip(index, scaled) if not s)
        return outer, _morton([i for i, s in zip(index, scaled) if s])

    units = sorted(itertools.product(*(range(g) for g in grid)), key=order)

    def assemble(index: Index) -> np.ndarray | None:
        """Unit ``index`` of level 0, written; None if it is all zero."""
        region = grid_region(index, unit, target.shape)
        pieces = plan.get(index)
        block = None
        if pieces:
            shape = [r.stop - r.start for r in region]
            # No zero fill where one window covers the whole unit.
            block = pool.take(shape, target.dtype, zero=index not in full)
            # Largest part first: units in progress side by side then each
            # decode their own main chunk rather than wait for the same one.
            volume: dict[Index, int] = {}
            for piece in pieces:
                for chunk, size in _reads(piece):
                    volume[chunk] = volume.get(chunk, 0) + size
            largest_first = sorted(volume, key=volume.__getitem__, reverse=True)
            decoded = {chunk: cache.get(chunk) for chunk in largest_first}
            for piece in pieces:  # in window order: a later window wins
                if isinstance(piece, _Piece):
                    block[piece.put] = decoded[piece.chunk][piece.read]
                else:
                    _resample_into(block[piece.put], piece, decoded, interpolation)
            for chunk in decoded:
                cache.release(chunk)
            del decoded
            if block.any():
                _write_unit(target, index, unit, block)
            else:
                pool.give(block)
                block = None  # all zero: leave the chunks unwritten
        return block

    def build(index: Index) -> None:
        pyramid.add(1, index, assemble(index))

    _run(build, units, workers, f"Level 0 and pyramid of {target.shape}")
    for level in range(fused + 1, len(levels)):
        downsample_level(
            levels[level - 1], levels[level], factors[level - 1], kind, workers
        )


def _write_unit(
    target: ChunkAccess, index: Index, unit: Sequence[int], block: np.ndarray
) -> None:
    """Write the block of unit ``index`` chunk by chunk (units are whole chunks)."""
    per_unit = [u // c for u, c in zip(unit, target.chunks)]
    for offset in itertools.product(*(range(n) for n in per_unit)):
        chunk = tuple(i * n + o for i, n, o in zip(index, per_unit, offset))
        if any(j * c >= n for j, c, n in zip(chunk, target.chunks, target.shape)):
            continue  # the unit reaches past the array's edge
        part = tuple(slice(o * c, (o + 1) * c) for o, c in zip(offset, target.chunks))
        target.write(chunk, block[part])


def _eager(array: zarr.Array) -> zarr.Array:
    """The array, writing every chunk it is given without comparing it to zero.

    Zarr otherwise compares each chunk with the fill value on its single event
    loop thread, which serialises the workers; the writers here skip all-zero
    blocks themselves, in parallel.
    """
    return array.with_config({"write_empty_chunks": True})


def _plan(
    chunks: Sequence[int],
    shape: Sequence[int],
    axes: Sequence[str],
    pairs: Sequence[WindowPair],
    unit: Sequence[int],
) -> tuple[dict[Index, list[_Piece | _Resample]], set[Index]]:
    """Per level-0 unit, the pieces of source chunks that fill it.

    Also returns the units that a single window covers entirely. Each unit's
    pieces are in window order, so that a later window wins.

    Raises:
        ValueError: If a rotated window lacks the y or x axis.
    """
    plan: dict[Index, list[_Piece | _Resample]] = {}
    full: set[Index] = set()
    for pair in pairs:
        split = _resampled if pair.rotates else _copied
        covered: dict[Index, int] = {}
        for index, piece in split(pair, chunks, shape, axes, unit):
            plan.setdefault(index, []).append(piece)
            volume = math.prod(s.stop - s.start for s in piece.put)
            covered[index] = covered.get(index, 0) + volume
        for index, volume in covered.items():
            region = grid_region(index, unit, shape)
            if volume == math.prod(r.stop - r.start for r in region):
                full.add(index)
    return plan, full


def _copied(
    pair: WindowPair,
    chunks: Sequence[int],
    shape: Sequence[int],
    axes: Sequence[str],
    unit: Sequence[int],
) -> Iterator[tuple[Index, _Piece]]:
    """A copied window cut at unit and source chunk edges: ``(unit, piece)``."""
    target = pair.target.slices()
    offset = dict(zip(pair.target.axes, pair.source.start))
    # Window extent per array axis, and source - target offset per axis.
    extent, delta = [], []
    for axis, n in zip(axes, shape):
        if axis in target:
            extent.append((target[axis].start, target[axis].stop))
            delta.append(offset[axis] - target[axis].start)
        else:
            extent.append((0, n))
            delta.append(0)
    # Split the window at unit edges (in target) and chunk edges (in source).
    cuts = []
    for (a, b), d, u, c in zip(extent, delta, unit, chunks):
        edges = {a, b}
        edges.update(range((a // u + 1) * u, b, u))
        edges.update(e - d for e in range(((a + d) // c + 1) * c, b + d, c))
        ordered = sorted(edges)
        cuts.append(list(zip(ordered, ordered[1:])))
    for part in itertools.product(*cuts):
        index = tuple(a // u for (a, _), u in zip(part, unit))
        chunk = tuple((a + d) // c for (a, _), d, c in zip(part, delta, chunks))
        put = tuple(
            slice(a - i * u, b - i * u) for (a, b), i, u in zip(part, index, unit)
        )
        read = tuple(
            slice(a + d - j * c, b + d - j * c)
            for (a, b), d, j, c in zip(part, delta, chunk, chunks)
        )
        yield index, _Piece(chunk, read, put)


def _resampled(
    pair: WindowPair,
    chunks: Sequence[int],
    shape: Sequence[int],
    axes: Sequence[str],
    unit: Sequence[int],
) -> Iterator[tuple[Index, _Resample]]:
    """A rotated window cut at unit edges: ``(unit, piece)``, one per unit.

    Raises:
        ValueError: If the window lacks the y or x axis.
    """
    transform = pair.transform
    assert transform is not None  # only rotated pairs come here
    if not {"y", "x"} <= set(pair.target.axes):
        raise ValueError(f"A rotation needs y and x axes, not {pair.target.axes}.")
    target = pair.target.slices()
    shift = transform.whole_pixel_shift([a for a in target if a not in ("y", "x")])
    moves = [shift.get(axis, 0) for axis in axes]  # c, t and y, x: none
    extent = [
        (target[a].start, target[a].stop) if a in target else (0, n)
        for a, n in zip(axes, shape)
    ]
    spans = [range(a // u, -(-b // u)) for (a, b), u in zip(extent, unit)]
    for index in itertools.product(*spans):
        cell = grid_region(index, unit, shape)
        part = [(max(r.start, a), min(r.stop, b)) for r, (a, b) in zip(cell, extent)]
        if all(a < b for a, b in part):
            piece = _resample_piece(part, cell, moves, transform, axes, chunks, shape)
            yield index, piece


def _resample_piece(
    part: Sequence[tuple[int, int]],
    cell: Region,
    moves: Sequence[int],
    transform: RigidTransform,
    axes: Sequence[str],
    chunks: Sequence[int],
    shape: Sequence[int],
) -> _Resample:
    """The piece filling ``part`` (level-0 ``[start, stop)`` per axis) of unit ``cell``.

    It reads the bounding box of the inverse-mapped part in (y, x) (see
    ``_sample_bounds``) and, along every other axis, the part moved back by
    its whole-pixel shift ``moves``; clipped to the source array. That is a
    few pixels more than the part, however large the window.
    """
    yx = (axes.index("y"), axes.index("x"))
    origin = (part[yx[0]][0], part[yx[1]][0])
    size = (part[yx[0]][1] - origin[0], part[yx[1]][1] - origin[1])
    matrix, offset = _inverse_affine(transform, origin)
    wanted = [(a - m, b - m) for (a, b), m in zip(part, moves)]
    low, high = _sample_bounds(matrix, offset, size)
    wanted[yx[0]], wanted[yx[1]] = (low[0], high[0]), (low[1], high[1])
    region = tuple(_clip(a, b, n) for (a, b), n in zip(wanted, shape))
    corner = np.array([region[yx[0]].start, region[yx[1]].start])
    return _Resample(
        parts=_tiling(region, chunks, shape),
        shape=tuple(r.stop - r.start for r in region),
        put=tuple(slice(a - r.start, b - r.start) for (a, b), r in zip(part, cell)),
        lead=tuple(
            w[0] - r.start
            for k, (w, r) in enumerate(zip(wanted, region))
            if k not in yx
        ),
        yx=yx,
        matrix=matrix,
        offset=offset - corner,
    )


def _inverse_affine(
    transform: RigidTransform, origin: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where target pixel ``origin + o`` (y, x) reads: ``matrix @ o + offset``.

    Both in level-0 pixels; the result is a source index coordinate (pixel
    ``j`` covers ``[j, j + 1)``, so its centre is index ``j``). The inverse
    is affine: its linear part is the steps of one pixel along y and x.
    """
    centre = np.asarray(origin, dtype=float) + 0.5
    steps = np.stack([centre, centre + (1.0, 0.0), centre + (0.0, 1.0)])
    points = transform.inverse_yx(steps) - 0.5
    return (points[1:] - points[0]).T, points[0]


def _sample_bounds(
    matrix: np.ndarray, offset: np.ndarray, size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (y, x) source pixels ``[low, high)`` a ``size`` block of samples needs.

    The samples' bounding box (that of the four corner samples), widened by
    ``_MARGIN`` pixels and by the next pixel linear interpolation reads.
    """
    corners = np.array([(y, x) for y in (0, size[0] - 1) for x in (0, size[1] - 1)])
    points = corners @ matrix.T + offset
    low = np.floor(points.min(axis=0)).astype(int) - _MARGIN
    high = np.ceil(points.max(axis=0)).astype(int) + 1 + _MARGIN
    return (int(low[0]), int(low[1])), (int(high[0]), int(high[1]))


def _clip(start: int, stop: int, n: int) -> slice:
    """``[start, stop)`` cut to ``[0, n)``; empty (at an end) when outside."""
    start = min(max(start, 0), n)
    return slice(start, max(min(stop, n), start))


def _tiling(
    region: Region, chunks: Sequence[int], shape: Sequence[int]
) -> tuple[_Piece, ...]:
    """The chunks that tile ``region``: read in each -> put in the region array.

    None at all for an empty region.
    """
    if any(r.start >= r.stop for r in region):
        return ()
    spans = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunks)]
    parts = []
    for chunk in itertools.product(*spans):
        cell = grid_region(chunk, chunks, shape)
        both = [
            (max(r.start, g.start), min(r.stop, g.stop)) for r, g in zip(region, cell)
        ]
        read = tuple(slice(a - g.start, b - g.start) for (a, b), g in zip(both, cell))
        put = tuple(slice(a - r.start, b - r.start) for (a, b), r in zip(both, region))
        parts.append(_Piece(chunk, read, put))
    return tuple(parts)


def _resample_into(
    out: np.ndarray,
    piece: _Resample,
    decoded: dict[Index, np.ndarray],
    order: int,
) -> None:
    """Fill ``out`` (the piece's part of a unit block) from the decoded chunks.

    Every pixel of ``out`` is written: 0 where the sample lies outside the
    source array.
    """
    if not piece.parts:
        out[...] = 0  # the whole part reads outside the source
        return
    region = np.empty(piece.shape, decoded[piece.parts[0].chunk].dtype)
    for part in piece.parts:
        region[part.put] = decoded[part.chunk][part.read]
    planes = np.moveaxis(out, piece.yx, (-2, -1))
    source = np.moveaxis(region, piece.yx, (-2, -1))
    for at in np.ndindex(planes.shape[:-2]):
        read = tuple(i + d for i, d in zip(at, piece.lead))
        if all(0 <= j < n for j, n in zip(read, source.shape[:-2])):
            _resample_plane(source[read], planes[at], piece.matrix, piece.offset, order)
        else:
            planes[at] = 0  # the whole-pixel shift reads beyond the source


def _resample_plane(
    plane: np.ndarray,
    out: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    order: int,
) -> None:
    """``out[o] = plane`` interpolated at index ``matrix @ o + offset``.

    Order 0 (nearest) copies source values exactly (for integers up to 2**53,
    which scipy passes through float64). Order 1 (linear) rounds to the
    nearest integer and clips to the range of an integer ``out``; a float
    ``out`` gets the values as they are. Samples beyond the plane's first or
    last pixel centre read 0 (scipy's ``mode="constant"``).
    """
    options = dict(order=order, mode="constant", cval=0.0, prefilter=False)
    if order == 0:
        ndimage.affine_transform(plane, matrix, offset, output=out, **options)
        return
    values = ndimage.affine_transform(
        plane, matrix, offset, output_shape=out.shape, output=np.float64, **options
    )
    if out.dtype.kind in "iu":
        info = np.iinfo(out.dtype)
        np.clip(np.rint(values, out=values), info.min, info.max, out=values)
    np.copyto(out, values, casting="unsafe")


def downsample_level(
    above: zarr.Array,
    below: zarr.Array,
    factors: Sequence[int],
    kind: Aggregation,
    workers: int = 1,
) -> None:
    """Compute one pyramid level from the level above it, tile by tile."""
    tile_shape = _tile_shape(below, (1,) * below.ndim)
    below = _eager(below)

    def reduce_tile(tile: tuple[slice, ...]) -> None:
        read = tuple(
            slice(s.start * f, min(s.stop * f, n))
            for s, f, n in zip(tile, factors, above.shape)
        )
        block = np.asarray(above[read])
        if not block.any():
            return  # all zero: leave the chunks unwritten
        down = downsample(block, factors, kind)
        below[tile] = down[tuple(slice(0, s.stop - s.start) for s in tile)]

    _run(reduce_tile, _tiles(below.shape, tile_shape), workers)
