"""Unit tests of the pure core: geometry, writer, atomic replace, HCS pairing."""

import os

import numpy as np
import pytest
import zarr

from fractal_tasks._geometry import Box, consensus_windows, roi_box, window_pair
from fractal_tasks._replace import exchange, recover, replace_directory
from fractal_tasks._writer import WindowPair, downsample, write_windows


def test_consensus_windows_have_one_shape_and_one_place():
    box = Box(("y", "x"), (0, 0), (100, 120))
    shifts = {"ref": {"y": 0, "x": 0}, "a": {"y": 3, "x": -5}, "b": {"y": -2, "x": 4}}
    win = consensus_windows({k: box for k in shifts}, shifts)
    assert {w.shape for w in win.values()} == {(95, 111)}
    assert win["ref"] == Box(("y", "x"), (3, 4), (98, 115))
    for name, w in win.items():
        assert w.shifted(shifts[name]) == win["ref"]


def test_consensus_of_absurd_shift_is_empty():
    box = Box(("y", "x"), (0, 0), (10, 10))
    win = consensus_windows(
        {"r": box, "a": box}, {"r": {"y": 0, "x": 0}, "a": {"y": 50, "x": 0}}
    )
    assert win["r"].is_empty


def test_roi_box_snaps_to_pixel_edges_and_clips():
    ps = {"y": 0.325, "x": 0.325}
    box = roi_box(
        {"y": (37 * 0.325, 10 * 0.325), "x": (-1.0, 5.0)}, ps, {"y": 100, "x": 100}
    )
    assert box == Box(("y", "x"), (37, 0), (47, 13))


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


@pytest.mark.parametrize("workers", [1, 3])
def test_write_windows_equals_whole_array_oracle(tmp_path, workers):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 1000, (2, 50, 70), dtype=np.uint16)
    src = zarr.create_array(tmp_path / "s", data=source, chunks=(1, 8, 8))
    levels = [
        zarr.create_array(
            tmp_path / f"l{i}",
            shape=(2, 50 // 2**i + (i == 2), 70 // 2**i + (i == 2)),
            dtype="uint16",
            chunks=(1, 8, 8),
            fill_value=0,
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
