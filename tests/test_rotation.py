"""Rotation between cycles: measured, reported, and registered (transform="rigid")."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.ndimage as ndi
from _workflow import apply, calculate, consensus
from ngio import open_ome_zarr_container
from skimage import data, draw

from fractal_tasks.geometry import (
    Box,
    RigidTransform,
    consensus_windows,
    largest_window,
)
from fractal_tasks.registration import calculate as calculate_module
from fractal_tasks.registration.calculate import (
    RoiEstimate,
    judge,
    load_quality,
    rigid_angles,
    rotated_whatever_the_shift,
)
from fractal_tasks.registration.rotation import RotationEstimate, estimate_rotation
from fractal_tasks.registration.shift import ShiftEstimate, estimate_shift

SHAPE = (270, 320)  # a 1080x1280 FOV at level 2


def _pair(image: np.ndarray, angle: float, shift: tuple[float, float]):
    """A reference crop and the crop an acquisition rotated about its centre sees.

    Acquisition pixel p shows the reference at ``c + R (p - c) + shift``.
    """
    big = ndi.zoom(image.astype(float), 2, order=3)
    top = (np.array(big.shape) - SHAPE) // 2
    reference = big[top[0] : top[0] + SHAPE[0], top[1] : top[1] + SHAPE[1]]
    motion = RigidTransform(angle, {"y": SHAPE[0] / 2, "x": SHAPE[1] / 2}, {})
    matrix = motion.matrix()
    centre = (np.array(SHAPE) - 1) / 2
    offset = top + centre - matrix @ centre + np.asarray(shift)
    moving = ndi.affine_transform(big, matrix, offset=offset, output_shape=SHAPE)
    return reference, moving


@pytest.mark.parametrize("kind", ["camera", "coins", "grass"])
@pytest.mark.parametrize("angle", [0.0, 0.3, -4.5])
def test_the_angle_of_crops_of_several_kinds(kind, angle):
    image = getattr(data, kind)()
    image = image[..., 1] if image.ndim == 3 else image
    reference, moving = _pair(image, angle, (3.4, -5.2))
    shift = estimate_shift(reference, moving).shift
    rotation = estimate_rotation(reference, moving, shift)
    assert rotation.measured
    assert abs(rotation.angle_deg - angle) <= 0.02
    np.testing.assert_allclose(rotation.shift, (3.4, -5.2), atol=0.05)


def test_no_structure_leaves_the_angle_unmeasured():
    flat = np.full(SHAPE, 100.0)
    rotation = estimate_rotation(flat, flat, (0.0, 0.0))
    assert not rotation.measured and not rotation.significant
    small = np.random.default_rng(0).random((100, 100))
    assert not estimate_rotation(small, small, (0.0, 0.0)).measured


def _ring_pair(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """A bright ring about the crop's centre (a dish or well rim), rotated."""
    ring = np.zeros(SHAPE)
    ring[draw.disk((135, 160), 64, shape=SHAPE)] = 1.0
    ring[draw.disk((135, 160), 56, shape=SHAPE)] = 0.0
    ring = ndi.gaussian_filter(ring, 1.5) * 1000 + 100
    reference, moving = _pair(ring, angle, (1.3, -2.6))
    rng = np.random.default_rng(3)
    return reference + rng.normal(0, 5, SHAPE), moving + rng.normal(0, 5, SHAPE)


def test_a_ring_about_the_centre_leaves_the_angle_unmeasured():
    """A rotation maps a ring about the centre onto itself: the blocks on it
    fix their shifts across the ring only, their matches stay with their
    windows and agree on no rotation at all, with a small scatter. The
    known turn of the last look shows it: the angle is not measured."""
    reference, moving = _ring_pair(1.0)
    shift = estimate_shift(reference, moving).shift
    rotation = estimate_rotation(reference, moving, shift)
    assert not rotation.measured


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blobs_of_20_px_are_measured_right_or_not_at_all(seed):
    """Smooth content whose fine frequencies are mostly camera noise sees a
    fraction of a rotation per look: the iterations stopped short, at an
    angle 0.4° off with an uncertainty of 0.04°. Now an angle is either
    within 3 SD of the truth or not measured."""
    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.standard_normal((400, 480)), 10)
    blobs = (blobs - blobs.min()) / np.ptp(blobs) * 2000 + 100
    reference, moving = _pair(blobs[65:335, 80:400], 0.5, (2.2, 1.7))
    reference = rng.poisson(reference).astype(float)
    moving = rng.poisson(moving).astype(float)
    shift = estimate_shift(reference, moving).shift
    rotation = estimate_rotation(reference, moving, shift)
    if rotation.measured:
        assert abs(rotation.angle_deg - 0.5) <= 3 * rotation.uncertainty_deg


def _inside(window: Box, box: Box, motion: RigidTransform) -> bool:
    corners = np.array(
        [
            (y, x)
            for y in (window.start[0], window.stop[0])
            for x in (window.start[1], window.stop[1])
        ],
        float,
    )
    back = motion.inverse_yx(corners)
    return bool(
        np.all(back >= np.array(box.start) - 1e-6)
        and np.all(back <= np.array(box.stop) + 1e-6)
    )


def test_the_consensus_window_lies_in_every_rotated_footprint_and_is_largest():
    box = Box(("y", "x"), (0, 0), (60, 80))
    motions = [
        RigidTransform(),
        RigidTransform(2.0, {"y": 30, "x": 40}, {"y": 1.3, "x": -2.2}),
        RigidTransform(-1.0, {"y": 30, "x": 40}, {"y": -0.4, "x": 1.7}),
    ]
    window = largest_window([box] * 3, motions)
    assert not window.is_empty
    assert all(_inside(window, box, m) for m in motions)
    # no integer rectangle inside them all is larger (brute force)
    best = 0
    for y0 in range(0, 20):
        for y1 in range(40, 61):
            for x0 in range(0, 20):
                for x1 in range(60, 81):
                    candidate = Box(("y", "x"), (y0, x0), (y1, x1))
                    if (y1 - y0) * (x1 - x0) > best and all(
                        _inside(candidate, box, m) for m in motions
                    ):
                        best = (y1 - y0) * (x1 - x0)
    assert math.prod(window.shape) == best


def test_windows_have_one_shape_and_translations_stay_intersections():
    box = Box(("z", "y", "x"), (0, 0, 0), (5, 60, 80))
    moves = {
        "r": RigidTransform(),
        "a": RigidTransform(0.0, {}, {"z": 1.0, "y": 2.4, "x": -3.6}),
    }
    windows = consensus_windows({"r": box, "a": box}, moves)
    assert windows["r"] == Box(box.axes, (1, 2, 0), (5, 60, 76))
    assert windows["a"] == Box(box.axes, (0, 0, 4), (4, 58, 80))
    moves["a"] = RigidTransform(1.5, {"y": 30, "x": 40}, {"z": 1.0, "y": 2.4})
    windows = consensus_windows({"r": box, "a": box}, moves)
    assert windows["r"].shape == windows["a"].shape
    assert windows["r"].start[0] == 1 and windows["a"].start[0] == 0


def test_an_empty_consensus_window_is_empty():
    box = Box(("y", "x"), (0, 0), (20, 20))
    far = RigidTransform(3.0, {"y": 10, "x": 10}, {"y": 40.0, "x": 0.0})
    assert largest_window([box, box], [RigidTransform(), far]).is_empty


def _rotation(angle: float, sigma: float = 0.002) -> RotationEstimate:
    return RotationEstimate(angle, sigma, (0.0, 0.0), 20)


def test_one_angle_for_the_well_only_where_the_rois_agree():
    agreeing = {"A": _rotation(0.50), "B": _rotation(0.51), "C": _rotation(math.nan)}
    angles, how = rigid_angles(agreeing, {"A", "B", "C"})
    assert angles["A"] == angles["B"] == angles["C"] == pytest.approx(0.505)
    assert "one angle for the well" in how["C"]
    apart = {"A": _rotation(0.2), "B": _rotation(0.9), "C": _rotation(0.4)}
    angles, how = rigid_angles(apart, {"A", "B"})
    assert angles == {"A": 0.2, "B": 0.9, "C": pytest.approx(0.55)}
    assert how["A"] == "this ROI's own"


ANGLE = 0.8


@pytest.fixture
def rotated_plate(make_plate):
    return make_plate(
        n_acquisitions=2,
        fov_shape=(256, 320),
        levels=2,
        rotation_deg=(0.0, ANGLE),
        subpixel=True,
        max_shift_fraction=0.02,
    )


def test_the_translation_model_reports_a_rotated_plate(rotated_plate, caplog):
    with caplog.at_level(logging.WARNING):
        calculate(rotated_plate, level_path="0")
    url = rotated_plate.images[1].zarr_url
    quality = load_quality(open_ome_zarr_container(url), "FOV_ROI_table")
    assert set(quality["registration_status"]) == {"rotated"}
    assert (quality["rotation_deg"] == 0).all()
    np.testing.assert_allclose(quality["measured_rotation_deg"], ANGLE, atol=0.03)
    assert (quality["residual_px"] > 1.0).all()
    assert quality["registration_note"].str.contains('transform="rigid"').all()
    rotated = [r for r in caplog.records if "are rotated" in r.getMessage()]
    assert len(rotated) == 1  # one line for the image, not one per ROI
    reference = rotated_plate.images[0].zarr_url
    quality = load_quality(open_ome_zarr_container(reference), "FOV_ROI_table")
    assert quality.empty or "rotated" not in set(quality["registration_status"])


def test_what_only_a_rotation_explains_is_not_read_finer(rotated_plate, monkeypatch):
    """Under the translation model, a ROI its own angle makes ``rotated`` is
    estimated at its level only: finer levels blur its match more (the
    corners move further in their pixels), so reading them, up to a whole
    camera frame, could change no verdict."""
    levels_tried = []
    retry = calculate_module.estimate_with_retry

    def spy(read_pair, paths, **kwargs):
        levels_tried.append(list(paths))
        return retry(read_pair, paths, **kwargs)

    monkeypatch.setattr(calculate_module, "estimate_with_retry", spy)
    calculate(rotated_plate, level_path="1")
    assert levels_tried == [["1"]] * 4
    levels_tried.clear()
    calculate(rotated_plate, level_path="1", transform="rigid")
    assert levels_tried == [["1", "0"]] * 4  # the rotation undone: as usual


def test_rotated_whatever_the_shift_needs_a_reliable_significant_angle():
    size, pixel = {"y": 300.0, "x": 300.0}, {"y": 1.0, "x": 1.0}
    assert rotated_whatever_the_shift(_rotation(0.8), size, pixel)  # 3 px
    assert not rotated_whatever_the_shift(_rotation(0.2), size, pixel)  # < 1 px
    assert not rotated_whatever_the_shift(_rotation(0.8, 0.5), size, pixel)
    assert not rotated_whatever_the_shift(_rotation(math.nan), size, pixel)


def _turned_well(angle: float, failed: str) -> dict[str, RoiEstimate]:
    """2x2 FOVs of 702x832 µm whose well turned by ``angle`` about its centre;
    ``failed`` has a peak that does not stand out."""
    well = RigidTransform(angle, {"y": 702.0, "x": 832.0}, {"y": 3.0, "x": -2.0})
    out = {}
    for name, (y, x) in {
        "FOV_1": (351.0, 416.0),
        "FOV_2": (351.0, 1248.0),
        "FOV_3": (1053.0, 416.0),
        "FOV_4": (1053.0, 1248.0),
    }.items():
        moved = well.about({"y": y, "x": x}).translation
        estimate = ShiftEstimate(
            shift=(moved["y"] / 1.3, moved["x"] / 1.3),
            ncc_before=0.1,
            ncc_after=0.8,
            peak_significance=4.0 if name == failed else 30.0,
            peak_elongation=1.0,
        )
        rotation = _rotation(angle, 0.001)
        out[name] = RoiEstimate(
            estimate, "2", {"y": 1.3, "x": 1.3}, rotation, {"y": y, "x": x}, angle
        )
    return out


def test_a_failed_roi_of_a_turned_well_moves_with_the_well():
    """A FOV that fails in a well that turned by 1° gets the shift of its own
    centre under the motion the good FOVs show, not their median (which is
    up to 45 px off at the corners of a 2x2 well of camera frames)."""
    sizes = {n: {"y": 702.0, "x": 832.0} for n in ("FOV_1", "FOV_2", "FOV_3", "FOV_4")}
    level0 = {"y": 0.325, "x": 0.325}
    for angle in (1.0, 0.0):
        estimates = _turned_well(angle, failed="FOV_1")
        results = judge(
            estimates,
            {"y": 1.3, "x": 1.3},
            level0,
            sizes,
            max_shift=None,
            keep_zero_if_all_failed=False,
            zarr_url="acquisition",
            transform="rigid",
        )
        failed = next(r for r in results if r.name == "FOV_1")
        assert failed.status == "fallback"
        truth = RigidTransform(angle, {"y": 702.0, "x": 832.0}, {"y": 3.0, "x": -2.0})
        expected = truth.about(estimates["FOV_1"].centre_um).translation
        got = failed.transform.translation
        if angle:
            assert got["y"] == pytest.approx(expected["y"], abs=1e-6)
            assert got["x"] == pytest.approx(expected["x"], abs=1e-6)
            assert "the well's motion fitted to the good ROIs" in failed.note
        else:  # no turn: the median of the good ones, as ever
            assert (got["y"], got["x"]) == (pytest.approx(3.0), pytest.approx(-2.0))
            assert "the median of the good ROIs" in failed.note


def test_a_small_turn_of_the_whole_well_is_judged_by_the_well_s_angle(caplog):
    """Each FOV alone measures 0.04 ± 0.015°: not 3 SD from 0, so on its own
    it would pass. The four agree, and their mean (± 0.0075°) is: the well
    turned, and the translation model leaves the corners of these camera
    frames more than a pixel away. Every FOV is ``rotated``; a single FOV
    of its own (nothing to agree with) is not judged."""
    sizes = {n: {"y": 702.0, "x": 832.0} for n in ("FOV_1", "FOV_2", "FOV_3", "FOV_4")}
    level0 = {"y": 0.325, "x": 0.325}
    estimates = {
        name: replace(e, rotation=_rotation(0.04, 0.015))
        for name, e in _turned_well(0.0, failed="").items()
    }

    def statuses(chosen: dict[str, RoiEstimate]) -> set[str]:
        results = judge(
            chosen,
            {"y": 1.3, "x": 1.3},
            level0,
            {n: sizes[n] for n in chosen},
            max_shift=None,
            keep_zero_if_all_failed=False,
            zarr_url="acquisition",
        )
        assert all(r.residual_px > 1.0 for r in results)
        return {r.status for r in results}

    with caplog.at_level(logging.WARNING):
        assert statuses(estimates) == {"rotated"}
    (warning,) = [r.getMessage() for r in caplog.records if "rotated" in r.getMessage()]
    assert "4 ROI(s) of acquisition are rotated (0.04° to 0.04°)" in warning
    assert statuses({"FOV_1": estimates["FOV_1"]}) == {"ok"}


def test_a_rotated_plate_through_the_three_tasks(rotated_plate):
    calculate(rotated_plate, level_path="0", transform="rigid")
    url = rotated_plate.images[1].zarr_url
    container = open_ome_zarr_container(url)
    quality = load_quality(container, "FOV_ROI_table")
    assert set(quality["registration_status"]) == {"ok"}
    np.testing.assert_allclose(quality["rotation_deg"], ANGLE, atol=0.02)
    assert max(rotated_plate.corner_errors(url).values()) <= 0.5
    consensus(rotated_plate)
    apply(rotated_plate, overwrite_input=False)
    reference = open_ome_zarr_container(rotated_plate.images[0].zarr_url)
    registered = open_ome_zarr_container(url + "_registered")
    ref = reference.get_image().get_array()[0, 0].astype(float)
    out = registered.get_image().get_array()[0, 0].astype(float)
    moved = container.get_image().get_array()[0, 0].astype(float)
    ps = rotated_plate.pixel_size
    for roi in reference.get_roi_table("FOV_ROI_table_registered").rois():
        y0, x0 = round(roi["y"].start / ps), round(roi["x"].start / ps)
        h, w = round(roi["y"].length / ps), round(roi["x"].length / ps)
        window = (slice(y0, y0 + h), slice(x0, x0 + w))
        assert out[window].min() > 0  # inside every footprint: no empty pixel
        after = np.corrcoef(ref[window].ravel(), out[window].ravel())[0, 1]
        before = np.corrcoef(ref[window].ravel(), moved[window].ravel())[0, 1]
        assert after > max(before, 0.95)
        # every quarter of the window (the corners too) is aligned
        for qy in (slice(y0, y0 + h // 2), slice(y0 + h // 2, y0 + h)):
            for qx in (slice(x0, x0 + w // 2), slice(x0 + w // 2, x0 + w)):
                e = estimate_shift(ref[qy, qx], out[qy, qx])
                assert np.hypot(*e.shift) <= 0.5
    labels = registered.get_label("nuclei").get_array()
    source = container.get_label("nuclei").get_array()
    assert set(np.unique(labels)) <= set(np.unique(source))


def test_a_rotated_3d_plate_through_the_three_tasks(make_plate):
    plate = make_plate(
        n_acquisitions=2,
        fov_shape=(192, 256),
        fovs=(1, 2),
        levels=2,
        n_z=4,
        rotation_deg=(0.0, -1.2),
        max_shift_z=1,
        subpixel=True,
    )
    calculate(plate, level_path="0", transform="rigid")
    url = plate.images[1].zarr_url
    container = open_ome_zarr_container(url)
    quality = load_quality(container, "FOV_ROI_table")
    assert set(quality["registration_status"]) == {"ok"}
    np.testing.assert_allclose(quality["rotation_deg"], -1.2, atol=0.03)
    assert max(plate.corner_errors(url).values()) <= 0.5
    consensus(plate)
    apply(plate, overwrite_input=True)
    registered = open_ome_zarr_container(url)
    reference = open_ome_zarr_container(plate.images[0].zarr_url)
    ref = reference.get_image().get_array()[0].astype(float)
    out = registered.get_image().get_array()[0].astype(float)
    ps = plate.pixel_size
    for roi in reference.get_roi_table("FOV_ROI_table_registered").rois():
        z0 = round(roi["z"].start / plate.z_spacing)
        nz = round(roi["z"].length / plate.z_spacing)
        y0, x0 = round(roi["y"].start / ps), round(roi["x"].start / ps)
        h, w = round(roi["y"].length / ps), round(roi["x"].length / ps)
        window = (slice(z0, z0 + nz), slice(y0, y0 + h), slice(x0, x0 + w))
        e = estimate_shift(ref[window], out[window])
        assert np.linalg.norm(e.shift) <= 0.5
