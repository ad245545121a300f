"""Unit tests of the pure core: geometry, writer, atomic replace, HCS pairing."""

import json
import logging
import math
import os
import threading

import numpy as np
import pytest
import zarr
from ngio import Roi, open_ome_zarr_well

from fractal_tasks.geometry import (
    Box,
    ImageGeometry,
    RigidTransform,
    at_most,
    consensus_windows,
    roi_box,
    same_pixel_size,
    same_value,
    window_pair,
)
from fractal_tasks.hcs import swap, wells
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.roi_tables import stored_translations
from fractal_tasks.hcs.swap import (
    exchange,
    lock_file,
    reading,
    recover,
    replace_directory,
)
from fractal_tasks.hcs.wells import require_local
from fractal_tasks.registration.consensus import stored_motions
from fractal_tasks.writer.pyramid import WindowPair, downsample, write_windows


def test_consensus_windows_have_one_shape_and_one_place():
    box = Box(("y", "x"), (0, 0), (100, 120))
    shifts = {"ref": {"y": 0, "x": 0}, "a": {"y": 3, "x": -5}, "b": {"y": -2, "x": 4}}
    moves = {k: RigidTransform(0.0, {}, v) for k, v in shifts.items()}
    win = consensus_windows({k: box for k in shifts}, moves)
    assert {w.shape for w in win.values()} == {(95, 111)}
    assert win["ref"] == Box(("y", "x"), (3, 4), (98, 115))
    for name, w in win.items():
        assert w.shifted(shifts[name]) == win["ref"]


def test_consensus_of_absurd_shift_is_empty():
    box = Box(("y", "x"), (0, 0), (10, 10))
    win = consensus_windows(
        {"r": box, "a": box},
        {"r": RigidTransform(), "a": RigidTransform(0.0, {}, {"y": 50, "x": 0})},
    )
    assert win["r"].is_empty


def test_roi_box_snaps_to_pixel_edges_and_clips():
    ps = {"y": 0.325, "x": 0.325}
    box = roi_box(
        {"y": (37 * 0.325, 10 * 0.325), "x": (-1.0, 5.0)}, ps, {"y": 100, "x": 100}
    )
    assert box == Box(("y", "x"), (37, 0), (47, 13))


def test_metadata_floats_equal_to_a_relative_1e6():
    ulp = math.nextafter(0.65, math.inf)
    assert ulp != 0.65 and same_value(0.65, ulp)
    assert same_value(1000.0, 1000.0009) and not same_value(1000.0, 1000.002)
    assert not same_value(0.65, 0.66)
    assert at_most(1.3 * 1.0000001, 1.3) and at_most(0.1, 1.3)
    assert not at_most(1.31, 1.3)
    assert same_pixel_size({"y": 0.65, "x": 0.65}, {"y": ulp, "x": 0.65})
    assert not same_pixel_size({"y": 0.65, "x": 0.65}, {"y": 0.65, "x": 0.66})
    assert not same_pixel_size({"y": 0.65, "x": 0.65}, {"y": 0.65})
    grid = ImageGeometry({"y": 0.65, "x": 0.65}, {"y": 10, "x": 20})
    assert grid.same_grid(ImageGeometry({"y": ulp, "x": ulp}, {"y": 10, "x": 20}))
    assert not grid.same_grid(ImageGeometry({"y": ulp, "x": ulp}, {"y": 10, "x": 21}))


def test_window_pair_uses_the_target_size_on_coarse_arrays():
    ps = {"y": 2.0, "x": 2.0}
    src, dst = window_pair(
        {"y": (3.0, 10.0), "x": (0.0, 8.0)},
        {"y": (1.0, 10.0), "x": (2.0, 8.0)},
        ps,
        {"y": 20, "x": 20},
    )
    assert src.shape == dst.shape
    with pytest.raises(ValueError, match="outside"):
        window_pair({"y": (30.0, 20.0)}, {"y": (0.0, 20.0)}, ps, {"y": 20, "x": 20})


def test_downsample_mean_rounds_and_nearest_keeps_values():
    block = np.array([[1, 2, 5], [3, 4, 6]], np.uint16)
    np.testing.assert_array_equal(downsample(block, (2, 2), "mean"), [[2, 6]])
    labels = np.array([[7, 0, 9], [0, 0, 0]], np.uint32)
    np.testing.assert_array_equal(downsample(labels, (2, 2), "nearest"), [[7, 9]])


LAYOUTS = {  # chunk files written directly (v2, v3) or through zarr (sharded)
    "v3": {},
    "v2": {"zarr_format": 2},
    "sharded": {"shards": (2, 16, 16)},
}


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_windows_equals_whole_array_oracle(tmp_path, workers, layout):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 1000, (2, 50, 70), dtype=np.uint16)
    src = zarr.create_array(
        tmp_path / "s", data=source, chunks=(1, 8, 8), **LAYOUTS[layout]
    )
    levels = [
        zarr.create_array(
            tmp_path / f"l{i}",
            shape=(2, 50 // 2**i + (i == 2), 70 // 2**i + (i == 2)),
            dtype="uint16",
            chunks=(1, 8, 8),
            fill_value=0,
            **LAYOUTS[layout],
        )
        for i in range(3)
    ]
    pairs = [
        WindowPair(
            Box(("y", "x"), (3, 5), (20, 40)), Box(("y", "x"), (0, 9), (17, 44))
        ),
        WindowPair(
            Box(("y", "x"), (30, 1), (50, 30)), Box(("y", "x"), (27, 33), (47, 62))
        ),
    ]
    write_windows(
        src,
        levels,
        ("c", "y", "x"),
        pairs,
        [(1, 2, 2), (1, 2, 2)],
        kind="mean",
        workers=workers,
    )
    want = np.zeros_like(source)
    for p in pairs:
        want[:, p.target.slices()["y"], p.target.slices()["x"]] = source[
            :, p.source.slices()["y"], p.source.slices()["x"]
        ]
    np.testing.assert_array_equal(levels[0][:], want)
    one = downsample(want, (1, 2, 2), "mean")
    np.testing.assert_array_equal(levels[1][:], one)
    two = downsample(one, (1, 2, 2), "mean")[
        :, : levels[2].shape[1], : levels[2].shape[2]
    ]
    np.testing.assert_array_equal(levels[2][:], two)


def test_exchange_swaps_and_replace_keeps_nothing_old(tmp_path):
    old, new = tmp_path / "img", tmp_path / "img.registering"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old")
    (new / "a").write_text("new")
    assert exchange(new, old)
    assert (old / "a").read_text() == "new" and (new / "a").read_text() == "old"
    replace_directory(new, old)
    assert (old / "a").read_text() == "old" and not new.exists()


def test_recover_restores_an_interrupted_fallback_replace(tmp_path):
    aside = tmp_path / "img.replaced"
    aside.mkdir()
    (aside / "a").write_text("old")
    recover(tmp_path / "img")
    assert (tmp_path / "img" / "a").read_text() == "old"
    assert not aside.exists()
    os.listdir(tmp_path)


def _two_images(tmp_path):
    old, new = tmp_path / "img", tmp_path / "img.registering"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a").write_text(text)
    return old, new


def test_fallback_replace_says_so_once_at_info_and_leaves_its_lock(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(swap, "exchange", lambda first, second: False)
    swap._log_fallback_once.cache_clear()
    caplog.set_level(logging.DEBUG, logger=swap.__name__)
    for _ in range(2):
        old, new = _two_images(tmp_path)
        replace_directory(new, old)
        assert (old / "a").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".img.lock", "img"]
        (old / "a").unlink(), old.rmdir()
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert lock_file(old) == tmp_path / ".img.lock"


def test_a_reader_restores_an_image_left_aside_by_a_killed_replace(tmp_path):
    aside = tmp_path / "img.replaced"
    aside.mkdir()
    (aside / "a").write_text("old")
    with reading(tmp_path / "img"):
        assert (tmp_path / "img" / "a").read_text() == "old"
    assert not aside.exists()


def test_a_missing_image_stays_missing_for_its_reader(tmp_path):
    with reading(tmp_path / "img"):
        assert not (tmp_path / "img").exists()


def test_a_replace_waits_for_a_reader_in_another_thread(tmp_path, monkeypatch):
    # fcntl locks do not tell threads of one process apart: swap must
    monkeypatch.setattr(swap, "exchange", lambda first, second: False)
    old, new = _two_images(tmp_path)
    replaced = threading.Event()

    def replace():
        replace_directory(new, old)
        replaced.set()

    with reading(old), reading(old):  # nested readers in one thread too
        writer = threading.Thread(target=replace)
        writer.start()
        assert not replaced.wait(0.3)
        assert (old / "a").read_text() == "old"
    assert replaced.wait(10)
    writer.join()
    assert (old / "a").read_text() == "new"


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32]
)
@pytest.mark.parametrize("factors", [(2, 2), (1, 2), (2, 2, 2), (4, 4), (3, 2)])
def test_downsample_integer_mean_equals_rounded_float_mean(dtype, factors):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    shape = (6, 9, 10)[-len(factors) :]
    block = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    block.flat[::3] = info.max  # extremes and many .5 ties
    block.flat[1::5] = info.min
    padded = np.pad(
        block, [(0, (-n) % f) for n, f in zip(block.shape, factors)], mode="edge"
    )
    split = [x for n, f in zip(padded.shape, factors) for x in (n // f, f)]
    want = np.rint(
        padded.reshape(split).mean(axis=tuple(range(1, 2 * block.ndim, 2)))
    ).astype(dtype)
    np.testing.assert_array_equal(downsample(block, factors, "mean"), want)


@pytest.mark.parametrize("chunks", [(1, 8, 8), (1, 7, 9), (2, 32, 64)])
@pytest.mark.parametrize("kind", ["mean", "nearest"])
def test_write_windows_overlaps_odd_chunks_and_labels(tmp_path, chunks, kind):
    rng = np.random.default_rng(2)
    dtype = np.uint16 if kind == "mean" else np.uint32
    source = rng.integers(0, 60000, (2, 41, 67)).astype(dtype)
    src = zarr.create_array(tmp_path / "s", data=source, chunks=(1, 10, 12))
    shapes = [(2, 41, 67), (2, 21, 34), (2, 10, 17), (2, 5, 9)]
    pairs = [  # the second overlaps the first and wins; the third covers a lot
        WindowPair(
            Box(("y", "x"), (0, 0), (30, 40)), Box(("y", "x"), (5, 3), (35, 43))
        ),
        WindowPair(
            Box(("y", "x"), (11, 20), (31, 50)), Box(("y", "x"), (1, 30), (21, 60))
        ),
        WindowPair(
            Box(("y", "x"), (1, 2), (41, 66)), Box(("y", "x"), (0, 0), (40, 64))
        ),
    ][: 2 if chunks[1] == 7 else 3]
    for workers in (1, 2):
        levels = [
            zarr.create_array(
                tmp_path / f"w{workers}l{i}",
                shape=s,
                dtype=dtype,
                chunks=chunks,
                fill_value=0,
            )
            for i, s in enumerate(shapes)
        ]
        write_windows(
            src,
            levels,
            ("c", "y", "x"),
            pairs,
            [(1, 2, 2)] * 3,
            kind=kind,
            workers=workers,
        )
        want = np.zeros_like(source)
        for p in pairs:
            t, s = p.target.slices(), p.source.slices()
            want[:, t["y"], t["x"]] = source[:, s["y"], s["x"]]
        for level in levels:
            got = level[:]
            np.testing.assert_array_equal(got, want[:, : got.shape[1], : got.shape[2]])
            want = downsample(want, (1, 2, 2), kind)


def _roi(name: str, **translation: float) -> Roi:
    columns = {f"translation_{a}": v for a, v in translation.items()}
    slices = {"z": (0.0, 1.0), "y": (0.0, 10.0), "x": (0.0, 10.0)}
    return Roi.from_values(name=name, slices=slices, **columns)


def test_stored_translations_all_none_or_a_clear_error():
    done = {"A": _roi("A", z=0.0, y=1.5, x=-2.0), "B": _roi("B", z=0.0, y=0.0, x=1.0)}
    assert stored_translations(done, "u", "FOV_ROI_table") == {
        "A": {"z": 0.0, "y": 1.5, "x": -2.0},
        "B": {"z": 0.0, "y": 0.0, "x": 1.0},
    }
    assert stored_translations({"A": _roi("A")}, "u", "FOV_ROI_table") is None
    half = {"A": done["A"], "B": _roi("B")}
    with pytest.raises(RegistrationInputError, match=r"no translation for \['B'\]"):
        stored_translations(half, "u", "FOV_ROI_table")


class _NoTables:
    """A container without tables: no quality table, so no rotation."""

    def list_tables(self) -> list[str]:
        return []


def test_consensus_needs_translations_in_every_acquisition():
    ref = {"A": _roi("A")}
    done = {"A": _roi("A", z=0.0, y=1.5, x=-2.0)}
    containers = dict.fromkeys("rab", _NoTables())
    motions = stored_motions(containers, {"r": ref, "a": done}, "r", "T")
    assert motions["r"]["A"] == RigidTransform()
    moved = motions["a"]["A"]
    assert moved.rotation_deg == 0.0
    assert moved.translation == {"z": 0.0, "y": 1.5, "x": -2.0}
    assert moved.center == {"y": 5.0, "x": 5.0}
    assert moved.in_pixels({"z": 1.0, "y": 0.5, "x": 0.5}).whole_pixel_shift("zyx") == {
        "z": 0,
        "y": 3,
        "x": -4,
    }
    with pytest.raises(RegistrationInputError, match="No translations.*any"):
        stored_motions(containers, {"r": ref, "a": ref}, "r", "T")
    with pytest.raises(RegistrationInputError, match=r"no translations in \['b'\]"):
        stored_motions(containers, {"r": ref, "a": done, "b": ref}, "r", "T")


@pytest.mark.parametrize(
    "url", ["/data/p.zarr/B/03/0", "p.zarr/B/03/0", "C:/data/p.zarr/B/03/0"]
)
def test_paths_are_local(url):
    require_local(url)


@pytest.mark.parametrize(
    "url, fix",
    [
        ("s3://bucket/p.zarr/B/03/0", "Copy or mount the plate there"),
        ("GS://bucket/p.zarr/B/03/0", "Copy or mount the plate there"),
        ("http://host/p.zarr/B/03/0", "Copy or mount the plate there"),
        ("file:///data/p.zarr/B/03/0", "Give the path itself, '/data/p.zarr/B/03/0'"),
    ],
)
def test_urls_with_a_scheme_are_refused(url, fix):
    with pytest.raises(RegistrationInputError, match="NFS, GPFS, Lustre, CephFS") as e:
        require_local(url)
    assert fix in str(e.value) and repr(url) in str(e.value)


def test_well_metadata_briefly_missing_is_read_again(make_plate, monkeypatch):
    plate = make_plate()
    well_url = f"{plate.plate_url}/B/03"
    calls = []

    def flaky(url, **options):
        calls.append(url)
        # as while another run renames the metadata over
        if len(calls) == 1:
            raise zarr.errors.GroupNotFoundError(url)
        if len(calls) == 2:
            raise json.JSONDecodeError("empty", "", 0)
        return open_ome_zarr_well(url, **options)

    monkeypatch.setattr(wells, "open_ome_zarr_well", flaky)
    monkeypatch.setattr(wells, "WELL_READ_PAUSES_S", (0, 0, 0))
    assert len(wells.open_well(well_url).paths()) == 3
    assert len(calls) == 3
    monkeypatch.setattr(wells, "WELL_READ_PAUSES_S", (0,))
    calls.clear()
    with pytest.raises(RegistrationInputError, match="no valid OME-Zarr well"):
        wells.open_well(well_url)
