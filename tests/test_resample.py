"""Rotated windows: resampled unit by unit, equal to resampling the whole plane."""

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from fractal_tasks.geometry import Box, RigidTransform
from fractal_tasks.writer import pyramid
from fractal_tasks.writer.pyramid import WindowPair, downsample, write_windows

YX = ("y", "x")


@pytest.fixture
def small_units(monkeypatch):
    """Units of one (uint32) or two (uint16) target chunks, a cache of 4 chunks.

    Many units then cut every window, and source chunks are dropped from the
    cache and decoded again while later units still need them.
    """
    monkeypatch.setattr(pyramid, "UNIT_BYTES", 2 * 16 * 16 * 2)
    monkeypatch.setattr(pyramid, "CACHE_BYTES", 4 * 21 * 19 * 2)


# Per array rank: source and target chunks, aligned along no spatial axis;
# the target's hold several z planes, so a unit's planes can straddle the
# source's edge in z.
SOURCE_CHUNKS = {3: (1, 21, 19), 4: (1, 3, 21, 19)}
TARGET_CHUNKS = {3: (1, 16, 16), 4: (1, 2, 16, 16)}


def _source(path: Path, data: np.ndarray) -> zarr.Array:
    return zarr.create_array(path, data=data, chunks=SOURCE_CHUNKS[data.ndim])


def _levels(path: Path, shape, dtype, n: int = 3) -> list[zarr.Array]:
    """Empty levels, y and x halved (rounded up) from one to the next."""
    levels = []
    for i in range(n):
        levels.append(
            zarr.create_array(
                path / f"l{i}",
                shape=shape,
                dtype=dtype,
                chunks=TARGET_CHUNKS[len(shape)],
                fill_value=0,
            )
        )
        shape = (*shape[:-2], -(-shape[-2] // 2), -(-shape[-1] // 2))
    return levels


def _write(source, path, axes, pairs, kind, workers=1, n=3) -> list[np.ndarray]:
    levels = _levels(path, source.shape, source.dtype, n)
    factors = [(1,) * (len(axes) - 2) + (2, 2)] * (n - 1)
    write_windows(source, levels, axes, pairs, factors, kind=kind, workers=workers)
    return [level[:] for level in levels]


def _target_mask(shape, axes, box: Box) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(box.slices().get(a, slice(None)) for a in axes)] = True
    return mask


def _whole_plane(source: np.ndarray, axes, pair: WindowPair, kind) -> np.ndarray:
    """Every pixel of the array resampled as ``pair`` says, plane by plane.

    The oracle: coordinates of the whole (y, x) plane built here, the planes
    along other axes moved by the whole-pixel shift (0 beyond the source).
    """
    order = 1 if kind == "mean" else 0
    transform = pair.transform
    ny, nx = source.shape[-2:]
    centres = np.stack(np.indices((ny, nx)), axis=-1) + 0.5
    at = transform.inverse_yx(centres) - 0.5
    coords = [at[..., 0], at[..., 1]]
    others = axes[:-2]
    shift = transform.whole_pixel_shift([a for a in others if a in pair.target.axes])
    out = np.zeros_like(source)
    for index in np.ndindex(source.shape[:-2]):
        read = tuple(i - shift.get(a, 0) for i, a in zip(index, others))
        if not all(0 <= j < n for j, n in zip(read, source.shape[:-2])):
            continue
        plane = source[read].astype(np.float64)
        values = ndimage.map_coordinates(
            plane, coords, order=order, mode="constant", cval=0, prefilter=False
        )
        info = np.iinfo(source.dtype)
        out[index] = np.clip(np.rint(values), info.min, info.max)
    return out


def _oracle(source, axes, pairs, kind) -> np.ndarray:
    """Level 0: each window in turn, copied or resampled from the whole array."""
    out = np.zeros_like(source)
    for pair in pairs:
        put = tuple(pair.target.slices().get(a, slice(None)) for a in axes)
        if pair.rotates:
            out[put] = _whole_plane(source, axes, pair, kind)[put]
        else:
            read = tuple(pair.source.slices().get(a, slice(None)) for a in axes)
            out[put] = source[read]
    return out


def _assert_pyramid(levels, kind) -> None:
    """Each level equals ``downsample`` of the one above, cut to its shape."""
    for above, level in zip(levels, levels[1:]):
        factors = (1,) * (above.ndim - 2) + (2, 2)
        want = downsample(above, factors, kind)
        np.testing.assert_array_equal(level, want[tuple(slice(n) for n in level.shape)])


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


def _rotation(deg: float, box: Box, **translation: float) -> RigidTransform:
    """``deg`` about the centre of ``box``'s (y, x) extent, then ``translation``."""
    sl = box.slices()
    centre = {a: (sl[a].start + sl[a].stop) / 2 for a in YX}
    return RigidTransform(deg, centre, translation)


def _image_2d() -> np.ndarray:
    """Two channels of smooth structure plus noise, uint16."""
    rng = np.random.default_rng(3)
    yy, xx = np.indices((70, 90))
    smooth = 20000 + 15000 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    noise = rng.integers(0, 5000, (2, 70, 90))
    return (smooth + noise).astype(np.uint16)


@pytest.mark.parametrize("kind", ["mean", "nearest"])
def test_translation_or_none_writes_the_copy_bytes(tmp_path, small_units, kind):
    data = _image_2d()
    source = _source(tmp_path / "s", data)
    src, dst = Box(YX, (5, 3), (60, 81)), Box(YX, (9, 0), (64, 78))
    shift = RigidTransform(0.0, {"y": 30.0, "x": 40.0}, {"y": 4.4, "x": -3.2})
    runs = {}
    for name, transform in [("none", None), ("shift", shift)]:
        pairs = [WindowPair(src, dst, transform)]
        _write(source, tmp_path / name, ("c", "y", "x"), pairs, kind)
        runs[name] = _files(tmp_path / name)
    assert runs["none"] and runs["shift"] == runs["none"]


CASES = {
    # axes, data, target box, transform (3 degrees about the window centre)
    "2d": lambda: (
        ("c", "y", "x"),
        _image_2d(),
        Box(YX, (0, 2), (70, 90)),  # at the array's edges: corners read outside
        {"y": 0.37, "x": -1.21},
    ),
    "3d": lambda: (
        ("c", "z", "y", "x"),
        np.stack([_image_2d()[:, :40, :50] + 4000 * z for z in range(5)], axis=1),
        Box(("z", *YX), (0, 4, 3), (5, 37, 46)),
        {"z": 1.4, "y": -0.62, "x": 0.85},  # z: 1 whole pixel, plane 0 reads 0
    ),
}


@pytest.mark.parametrize("kind", ["mean", "nearest"])
@pytest.mark.parametrize("case", CASES)
def test_rotation_equals_resampling_the_whole_plane(tmp_path, small_units, case, kind):
    axes, data, box, translation = CASES[case]()
    # over a copy into the same box, which the rotation must replace wholly,
    # with zeros where it reads outside the source
    under = WindowPair(Box(box.axes, (0,) * len(box.axes), box.shape), box)
    pair = WindowPair(box, box, _rotation(3.0, box, **translation))
    source = _source(tmp_path / "s", data)
    got = _write(source, tmp_path / "o", axes, [under, pair], kind)[0]
    want = _whole_plane(data, axes, pair, kind)
    inside = _target_mask(data.shape, axes, box)
    error = np.abs(got.astype(int) - want.astype(int))[inside]
    if kind == "mean":  # rounding apart, the same values
        assert error.max() <= 1 and np.mean(error > 0) < 0.01
    else:
        assert error.max() == 0
    assert not got[~inside].any()
    assert got[inside].any() and not got[inside].all()  # zeros: read outside
    if case == "3d":  # the first plane of the box reads z = -1: outside
        assert not got[:, 0].any() and got[:, 1][inside[:, 1]].all()


def _discs(shape, centres, radius: float, labels) -> np.ndarray:
    yy, xx = np.indices(shape)
    out = np.zeros(shape, np.uint32)
    for (cy, cx), label in zip(centres, labels):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = label
    return out


def test_rotated_labels_keep_their_values_and_areas(tmp_path, small_units):
    labels = [3, 17, 250, 65537, 4_000_001, 9]
    centres = [(30, 30), (30, 70), (60, 45), (85, 30), (85, 75), (4, 50)]
    data = _discs((110, 120), centres, 10.5, labels)[None]  # the last one is cut
    box = Box(YX, (8, 6), (104, 112))
    transform = _rotation(7.0, box, y=0.41, x=-0.27)
    pair = WindowPair(box, box, transform)
    levels = _write(
        _source(tmp_path / "s", data), tmp_path / "o", ("c", *YX), [pair], "nearest"
    )
    got = levels[0]
    assert set(np.unique(got)) <= set(np.unique(data))
    assert not got[~_target_mask(data.shape, ("c", *YX), box)].any()
    for label, centre in zip(labels[:-1], centres[:-1]):
        moved = transform.apply_yx(np.add(centre, 0.5))
        assert 20 < moved[0] < 92 and 20 < moved[1] < 98  # the disc is inside
        area = np.count_nonzero(data == label)
        assert abs(np.count_nonzero(got == label) - area) <= 0.03 * area
    _assert_pyramid(levels, "nearest")


def _mixed_pairs() -> list[WindowPair]:
    """A copy, a rotation over it, a copy over that, a rotation reading 0."""
    first = Box(YX, (0, 0), (40, 50))
    rotated = Box(YX, (20, 25), (68, 88))
    away = Box(YX, (2, 30), (14, 45))
    return [
        WindowPair(Box(YX, (5, 7), (45, 57)), first),
        WindowPair(rotated, rotated, _rotation(-4.5, rotated, y=1.3, x=-0.6)),
        WindowPair(Box(YX, (0, 0), (12, 15)), Box(YX, (50, 10), (62, 25))),
        # reads only outside the source: zeros over the first copy
        WindowPair(away, away, _rotation(2.0, away, y=500.0)),
    ]


@pytest.mark.parametrize("kind", ["mean", "nearest"])
def test_a_later_window_wins_and_levels_are_downsampled(tmp_path, small_units, kind):
    data = _image_2d()
    pairs = _mixed_pairs()
    levels = _write(
        _source(tmp_path / "s", data), tmp_path / "o", ("c", *YX), pairs, kind, n=4
    )
    want = _oracle(data, ("c", *YX), pairs, kind)
    tolerance = 1 if kind == "mean" else 0
    assert np.abs(levels[0].astype(int) - want.astype(int)).max() <= tolerance
    copies = ~_target_mask(data.shape, ("c", *YX), pairs[1].target)
    copies |= _target_mask(data.shape, ("c", *YX), pairs[2].target)
    np.testing.assert_array_equal(levels[0][copies], want[copies])
    assert not levels[0][_target_mask(data.shape, ("c", *YX), pairs[3].target)].any()
    _assert_pyramid(levels, kind)


def test_workers_give_the_same_bytes(tmp_path, small_units):
    data = np.stack([_image_2d()[:, :48, :64] // (z + 1) for z in range(3)], axis=1)
    box = Box(("z", *YX), (0, 2, 1), (3, 46, 62))
    pairs = [WindowPair(box, box, _rotation(3.0, box, z=-0.2, y=0.3, x=0.7))]
    source = _source(tmp_path / "s", data)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        _write(source, out, ("c", "z", *YX), pairs, "mean", workers=workers)
        runs[workers] = _files(out)
    assert runs[1] and runs[2] == runs[1]


def test_a_rotated_unit_reads_a_bounded_region():
    # planned only (no data): the region each unit reads does not grow with
    # the window, and the interior units are wholly covered (no zero fill)
    unit, chunks = (1, 512, 512), (1, 256, 256)
    extents = []
    for n in (4096, 16384):
        box = Box(YX, (100, 100), (n - 100, n - 100))
        pair = WindowPair(box, box, _rotation(3.0, box, y=5.5, x=-3.25))
        plan, full = pyramid._plan(chunks, (1, n, n), ("c", *YX), [pair], unit)
        pieces = [p for unit_pieces in plan.values() for p in unit_pieces]
        extents.append(max(max(p.shape[1:]) for p in pieces))
        assert max(len(p.parts) for p in pieces) <= 4 * 4  # chunks a side
        assert len(full) == (math.ceil(n / 512) - 2) ** 2
    angle = math.radians(3.0)
    assert extents[0] == extents[1] <= 512 * (math.cos(angle) + math.sin(angle)) + 4


def test_a_rotation_needs_y_and_x(tmp_path):
    data = np.ones((1, 8, 8), np.uint16)
    box = Box(("y",), (0,), (8,))
    pair = WindowPair(box, box, RigidTransform(2.0, {"y": 4.0}, {}))
    with pytest.raises(ValueError, match="needs y and x"):
        _write(
            _source(tmp_path / "s", data), tmp_path / "o", ("c", *YX), [pair], "mean"
        )
