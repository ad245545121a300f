"""Stream registered windows into a new pyramid, in bounded chunk-aligned tiles.

The new image starts empty (unwritten chunks read as zero). Level 0 is written
tile by tile: a tile is a whole number of chunks, so no two writers ever share a
chunk, and a tile that no window touches is never written. Each tile's level-1
block is computed from the tile already in memory; coarser levels are computed
from the level just above them. Memory is a few tiles per worker, whatever the
size of the well.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zarr

from fractal_tasks._geometry import Box

Aggregation = Literal["mean", "nearest"]
TILE_BYTES = 32 * 2**20  # upper bound of one tile in memory


@dataclass(frozen=True)
class WindowPair:
    """Copy ``source`` (acquisition pixels) to ``target`` (reference pixels)."""

    source: Box
    target: Box


def downsample(
    block: np.ndarray, factors: Sequence[int], kind: Aggregation
) -> np.ndarray:
    """Reduce ``block`` by integer ``factors`` per axis.

    ``mean`` averages each factor-sized cell (rounded to the nearest integer for
    integer dtypes), for intensities; ``nearest`` keeps the first pixel of each
    cell, so label values are preserved exactly. An axis whose length is not a
    multiple of its factor is padded by repeating its last pixel.
    """
    if all(f == 1 for f in factors):
        return block
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
    if any(after for _, after in pad):
        block = np.pad(block, pad, mode="edge")
    if kind == "nearest":
        return block[tuple(slice(None, None, f) for f in factors)]
    split = []
    for n, f in zip(block.shape, factors):
        split += [n // f, f]
    mean = block.reshape(split).mean(axis=tuple(range(1, 2 * block.ndim, 2)))
    if np.issubdtype(block.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(block.dtype)


def _tile_shape(array: zarr.Array, factors: Sequence[int]) -> tuple[int, ...]:
    """Whole chunks, times the downsampling factor, grown in y/x up to TILE_BYTES."""
    tile = [c * f for c, f in zip(array.chunks, factors)]
    item = np.dtype(array.dtype).itemsize
    for axis in itertools.cycle(range(array.ndim - 1, max(array.ndim - 3, -1), -1)):
        if math.prod(tile) * item * 2 > TILE_BYTES or all(
            t >= n for t, n in zip(tile[-2:], array.shape[-2:])
        ):
            break
        if tile[axis] < array.shape[axis]:
            tile[axis] *= 2
    return tuple(tile)


def _tiles(shape: Sequence[int], tile: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Chunk-aligned tiles covering ``shape``, clipped at the far edges."""
    ranges = [range(0, n, t) for n, t in zip(shape, tile)]
    for origin in itertools.product(*ranges):
        yield tuple(slice(o, min(o + t, n)) for o, t, n in zip(origin, tile, shape))


def _run(jobs: Callable[[tuple[slice, ...]], None], tiles, workers: int) -> None:
    """Run one job per tile on ``workers`` threads; re-raise the first error."""
    if workers <= 1:
        for tile in tiles:
            jobs(tile)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(jobs, tiles):
            pass


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
        pairs: Windows to copy, in level-0 pixels over the spatial axes.
        factors: Per level after the first, the integer factor per axis from
            the level above (e.g. ``(1, 1, 2, 2)``).
        kind: ``"mean"`` for intensities, ``"nearest"`` for labels.
        workers: Threads to use; each works on its own tiles.
    """
    target = levels[0]
    if source.shape != target.shape:
        raise ValueError(f"Shapes differ: {source.shape} vs {target.shape}.")
    first = factors[0] if factors else (1,) * target.ndim
    fuse = len(levels) > 1
    tile_shape = _tile_shape(target, first)

    def copy_tile(tile: tuple[slice, ...]) -> None:
        region = {axis: s for axis, s in zip(axes, tile)}
        block = None
        for pair in pairs:
            spatial = pair.target.slices()
            inside = {
                a: slice(max(s.start, region[a].start), min(s.stop, region[a].stop))
                for a, s in spatial.items()
            }
            if any(s.start >= s.stop for s in inside.values()):
                continue
            if block is None:
                block = np.zeros([s.stop - s.start for s in tile], target.dtype)
            offset = dict(zip(pair.target.axes, pair.source.start))
            read, put = [], []
            for axis, s in zip(axes, tile):
                if axis in inside:
                    i = inside[axis]
                    start = offset[axis] - spatial[axis].start
                    read.append(slice(i.start + start, i.stop + start))
                    put.append(slice(i.start - s.start, i.stop - s.start))
                else:
                    read.append(s)
                    put.append(slice(None))
            block[tuple(put)] = source[tuple(read)]
        if block is None:
            return
        target[tile] = block
        if fuse:
            down = downsample(block, first, kind)
            below = tuple(
                slice(s.start // f, s.start // f + n)
                for s, f, n in zip(tile, first, down.shape)
            )
            below = tuple(
                slice(b.start, min(b.stop, n)) for b, n in zip(below, levels[1].shape)
            )
            levels[1][below] = down[tuple(slice(0, b.stop - b.start) for b in below)]

    fuse = fuse and _fusable(levels[1], tile_shape, first)
    _run(copy_tile, _tiles(target.shape, tile_shape), workers)
    start = 2 if fuse else 1
    for level in range(start, len(levels)):
        downsample_level(
            levels[level - 1], levels[level], factors[level - 1], kind, workers
        )


def _fusable(below: zarr.Array, tile: Sequence[int], factors: Sequence[int]) -> bool:
    """Whether each level-0 tile maps onto whole chunks of the level below."""
    return all(
        (t // f) % c == 0 or t // f >= n
        for t, f, c, n in zip(tile, factors, below.chunks, below.shape)
    )


def downsample_level(
    above: zarr.Array,
    below: zarr.Array,
    factors: Sequence[int],
    kind: Aggregation,
    workers: int = 1,
) -> None:
    """Compute one pyramid level from the level above it, tile by tile."""
    tile_shape = _tile_shape(below, (1,) * below.ndim)

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
