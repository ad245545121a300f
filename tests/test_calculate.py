"""Calculate registration: accuracy, verdicts, fallbacks, and what lies beyond."""

import sys

import numpy as np
import pytest
from _workflow import calculate, tree_hash, urls_of
from ngio import open_ome_zarr_container
from ngio.tables import RoiTable

from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.registration.calculate import load_quality

FOV = dict(fov_shape=(128, 160), n_acquisitions=2)


def _rois(url):
    """Per ROI name: the ROI table's extra columns and the quality table's row."""
    container = open_ome_zarr_container(url)
    quality = load_quality(container, "FOV_ROI_table")
    return {
        r.name: {**r.model_extra, **quality.loc[r.name].to_dict()}
        for r in container.get_roi_table("FOV_ROI_table").rois()
    }


def _found_px(plate, extra):
    return np.array([extra[f"translation_{a}"] for a in "zyx"]) / [
        plate.z_spacing,
        plate.pixel_size,
        plate.pixel_size,
    ]


def _edit_fov(url, fov_index, change):
    """Change the level-0 pixels of one FOV (2x2 grid) and rebuild the pyramid."""
    image = open_ome_zarr_container(url).get_image()
    data = image.get_array()
    h, w = data.shape[-2] // 2, data.shape[-1] // 2
    y, x = divmod(fov_index, 2)
    box = (..., slice(y * h, (y + 1) * h), slice(x * w, (x + 1) * w))
    data[box] = change(data[box])
    image.set_array(data)
    image.consolidate(mode="auto")


def test_subpixel_shifts_are_recovered_to_a_tenth_of_a_pixel(make_plate):
    plate = make_plate(subpixel=True, **FOV)
    calculate(plate)
    url = urls_of(plate)[1]
    errors = [
        np.abs(_found_px(plate, e) - plate.true_translation_px(url, n)).max()
        for n, e in _rois(url).items()
    ]
    assert np.median(errors) <= 0.1
    assert max(errors) < 0.5


def test_3d_shift_with_z_is_recovered(make_plate):
    plate = make_plate(n_z=8, max_shift_z=2, seed=3, **FOV)
    calculate(plate)
    url = urls_of(plate)[1]
    for name, extra in _rois(url).items():
        np.testing.assert_array_equal(
            np.round(_found_px(plate, extra)), plate.true_translation_px(url, name)
        )


def test_empty_fov_falls_back_to_the_median_of_the_good_ones(make_plate, caplog):
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    _edit_fov(url, 1, lambda block: np.full_like(block, 500))
    with caplog.at_level("INFO"):
        calculate(plate)
    # the whole run says "warning" once: the one line that names the ROI
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ROI FOV_2 of" in warnings[0].getMessage()
    assert caplog.text.lower().count("warning") == 1
    rois = _rois(url)
    assert rois["FOV_2"]["registration_status"] == "fallback"
    note = rois["FOV_2"]["registration_note"]
    assert note.startswith("correlation undefined (constant image")
    # the synthetic FOVs moved independently by up to a few pixels: the note
    # says the fallback is a guess, with the spread of the good ROIs
    assert "which differ from it by up to" in note and note.endswith("a guess")
    good = np.array([_found_px(plate, rois[n]) for n in ("FOV_1", "FOV_3", "FOV_4")])
    np.testing.assert_allclose(
        _found_px(plate, rois["FOV_2"]), np.median(good, axis=0), atol=1e-6
    )
    assert {rois[n]["registration_status"] for n in ("FOV_1", "FOV_3", "FOV_4")} == {
        "ok"
    }


def test_every_fov_empty_is_a_clear_error_or_zero_on_request(make_plate):
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    for i in range(4):
        _edit_fov(url, i, lambda block: np.full_like(block, 500))
    with pytest.raises(RegistrationInputError, match="failed for every ROI"):
        calculate(plate)
    calculate(plate, keep_zero_if_all_failed=True)
    for extra in _rois(url).values():
        assert extra["registration_status"] == "failed"
        assert [extra[f"translation_{a}"] for a in "zyx"] == [0.0, 0.0, 0.0]


def test_saturated_fov_falls_back_and_the_table_says_why(make_plate):
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]

    def clip(block):  # a gain far too high: most pixels at the camera's maximum
        return np.minimum(block.astype(np.int64) * 50, 4095).astype(block.dtype)

    _edit_fov(url, 3, clip)
    calculate(plate)
    rois = _rois(url)
    assert rois["FOV_4"]["registration_status"] == "fallback"
    assert rois["FOV_4"]["registration_note"].startswith("saturated: ")
    assert rois["FOV_4"]["saturated"] > 0.5
    for name in ("FOV_1", "FOV_2", "FOV_3"):
        assert rois[name]["saturated"] < 0.01
        assert not rois[name]["registration_note"].startswith("saturated")


def test_injected_outlier_is_caught(make_plate):
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    _edit_fov(url, 2, lambda block: np.roll(block, (11, -13), axis=(-2, -1)))
    calculate(plate)
    rois = _rois(url)
    assert rois["FOV_3"]["registration_status"] == "fallback"
    assert "outlier" in rois["FOV_3"]["registration_note"]
    assert (
        np.abs(
            _found_px(plate, rois["FOV_3"]) - plate.true_translation_px(url, "FOV_3")
        ).max()
        < 3
    )


def test_max_shift_marks_a_roi_failed(make_plate):
    plate = make_plate(max_shift_fraction=0.08, seed=4, **FOV)
    url = urls_of(plate)[1]
    shifts = {
        n: np.abs(plate.true_translation_um(url, n)).max() for n in plate.fov_names
    }
    limit = float(np.median(list(shifts.values())))
    calculate(plate, max_shift=limit)
    rois = _rois(url)
    flagged = {
        n for n, e in rois.items() if "beyond max_shift" in e["registration_note"]
    }
    assert flagged, shifts
    assert all(shifts[n] > limit for n in flagged)
    assert all(rois[n]["registration_status"] == "fallback" for n in flagged)


def test_rois_of_different_shapes_register_on_their_common_part(make_plate):
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    container = open_ome_zarr_container(url)
    rois = container.get_roi_table("FOV_ROI_table").rois()
    shorter = [
        r.update_slice("x", (r["x"].start, r["x"].length - 3 * plate.pixel_size))
        for r in rois
    ]
    container.add_table("FOV_ROI_table", RoiTable(rois=shorter), overwrite=True)
    calculate(plate)
    for name, extra in _rois(url).items():
        np.testing.assert_array_equal(
            np.round(_found_px(plate, extra)), plate.true_translation_px(url, name)
        )


def test_chi2_shift_writes_the_same_columns(make_plate):
    plate = make_plate(**FOV)
    calculate(plate, method="chi2_shift")
    url = urls_of(plate)[1]
    for name, extra in _rois(url).items():
        assert extra["registration_status"] == "ok"
        assert extra["ncc_after"] >= extra["ncc_before"]
        np.testing.assert_array_equal(
            np.round(_found_px(plate, extra)), plate.true_translation_px(url, name)
        )


def test_chi2_shift_refuses_3d(make_plate):
    plate = make_plate(n_z=3, **FOV)
    with pytest.raises(RegistrationInputError, match="chi2_shift.*2D"):
        calculate(plate, method="chi2_shift")


def test_chi2_shift_without_its_package_says_how_to_install_it(make_plate, monkeypatch):
    plate = make_plate(**FOV)
    monkeypatch.setitem(sys.modules, "image_registration", None)  # not installed
    before = tree_hash(plate.plate_url)
    with pytest.raises(ModuleNotFoundError) as error:
        calculate(plate, method="chi2_shift")
    assert 'pip install "fractal-tasks[chi2]"' in str(error.value)
    assert "pip_extras='chi2'" in str(error.value)
    assert tree_hash(plate.plate_url) == before
    calculate(plate)  # the default method does not need it


def test_rois_too_small_at_the_level_are_estimated_at_a_finer_one(make_plate, caplog):
    """A 64x64 image, two FOVs of 32x64 px (8x16 px at level 2), a 10x10 bright
    block in each, moved by (4, 8) px in the acquisition: found exactly."""
    plate = make_plate(fovs=(2, 1), fov_shape=(32, 64), n_acquisitions=2, labels=False)
    reference_url, url = urls_of(plate)
    for image_url, offset in ((reference_url, (0, 0)), (url, (4, 8))):
        image = open_ome_zarr_container(image_url).get_image()
        data = np.full(image.shape, 100, dtype=image.dtype)
        for top in (8, 40):  # one block per FOV
            y, x = top + offset[0], 20 + offset[1]
            data[..., y : y + 10, x : x + 10] = 3000
        image.set_array(data)
        image.consolidate(mode="auto")
    with caplog.at_level("INFO"):
        calculate(plate, level_path="2")
    assert "smaller than 32 px in y or x at level 2; estimated at level(s) ['0']" in (
        caplog.text
    )
    for name, extra in _rois(url).items():
        assert extra["registration_status"] == "ok", extra["registration_note"]
        assert extra["level_path"] == "0"
        found = _found_px(plate, extra)
        np.testing.assert_allclose(found, [0.0, -4.0, -8.0], atol=0.05, err_msg=name)


def test_reference_channel_of_its_own(make_plate):
    """reference_wavelength_id picks the reference's channel (id or label); the
    result equals registering on the same channel, and a missing one errs."""
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    calculate(plate)
    same = _rois(url)
    calculate(plate, reference_wavelength_id="DAPI")  # the same channel, by label
    by_label = _rois(url)
    for name in same:
        for axis in "zyx":
            key = f"translation_{axis}"
            assert by_label[name][key] == pytest.approx(same[name][key], abs=1e-9)
    with pytest.raises(RegistrationInputError, match="'NOPE'.*reference_wavelength_id"):
        calculate(plate, reference_wavelength_id="NOPE")


def test_old_quality_columns_leave_the_roi_table(make_plate):
    """A table written by an earlier version (registration_* columns in the ROI
    table, which ngio warns about on every read) keeps only the translations."""
    plate = make_plate(**FOV)
    url = urls_of(plate)[1]
    container = open_ome_zarr_container(url)
    rois = container.get_roi_table("FOV_ROI_table").rois()
    old = [r.model_copy(update={"registration_status": "ok"}) for r in rois]
    container.add_table("FOV_ROI_table", RoiTable(rois=old), overwrite=True)
    calculate(plate)
    for roi in open_ome_zarr_container(url).get_roi_table("FOV_ROI_table").rois():
        assert sorted(roi.model_extra) == [
            "translation_x",
            "translation_y",
            "translation_z",
        ]


def _retry_reads(passing_path, *, max_pixels):
    """estimate_with_retry over levels 2, 1, 0 where only ``passing_path``
    holds a match (64x64 px, the acquisition cut (-3, 5) px off the
    reference); the others hold two unrelated noise images. Returns
    (estimate, level kept, levels read)."""
    from scipy import ndimage

    from fractal_tasks.registration.calculate import estimate_with_retry

    rng = np.random.default_rng(1)
    texture = ndimage.gaussian_filter(rng.random((96, 96)), 2)
    match = texture[16:80, 16:80], texture[13:77, 21:85]
    noise = rng.random((64, 64)), rng.random((64, 64))
    read = []

    def read_pair(path):
        read.append(path)
        return match if path == passing_path else noise

    estimate, path = estimate_with_retry(
        read_pair,
        ["2", "1", "0"],
        pixels=lambda path: 64 * 64 * 4 ** (2 - int(path)),  # as if 2x per level
        max_pixels=max_pixels,
    )
    return estimate, path, read


def test_a_failed_roi_is_retried_at_each_finer_level_until_one_passes():
    estimate, path, read = _retry_reads("0", max_pixels=10**6)
    assert (path, read) == ("0", ["2", "1", "0"])
    np.testing.assert_allclose(estimate.shift, [-3.0, 5.0], atol=0.05)
    assert _retry_reads("1", max_pixels=10**6)[1:] == ("1", ["2", "1"])
    assert _retry_reads("2", max_pixels=10**6)[1:] == ("2", ["2"])


def test_a_passing_estimate_with_an_elongated_peak_is_confirmed_finer():
    """Level 2 holds a streaky texture (elongation 1.9: passes, but above
    CONFIRM_FINER), level 1 a round one: level 1 is read and kept; with
    unrelated images at level 1 and 0, the level-2 estimate is kept."""
    from scipy import ndimage

    from fractal_tasks.registration.calculate import estimate_with_retry
    from fractal_tasks.registration.shift import CONFIRM_FINER, estimate_shift

    rng = np.random.default_rng(1)
    noise = rng.random((64, 64)), rng.random((64, 64))
    textures = {}
    for name, sigma in (("streaks", (1, 2.5)), ("round", 2)):
        t = ndimage.gaussian_filter(rng.random((96, 96)), sigma)
        textures[name] = t[16:80, 16:80], t[13:77, 21:85]
    assert not CONFIRM_FINER.holds(estimate_shift(*textures["streaks"]).peak_elongation)
    for finer, want in (
        (textures["round"], ("1", ["2", "1"])),
        (noise, ("2", ["2", "1", "0"])),
    ):
        read = []

        def read_pair(path, finer=finer, read=read):
            read.append(path)
            return textures["streaks"] if path == "2" else finer

        estimate, path = estimate_with_retry(
            read_pair, ["2", "1", "0"], pixels=lambda path: 4096, max_pixels=10**6
        )
        assert (path, read) == want
        np.testing.assert_allclose(estimate.shift, [-3.0, 5.0], atol=0.05)


def test_the_retry_skips_a_level_where_the_roi_exceeds_the_pixel_budget():
    """Level 0 would be 65536 px, over a budget of 20000: not read, and the
    failed estimate of the ROI's own level is kept."""
    from fractal_tasks.registration.shift import judge_estimate

    estimate, path, read = _retry_reads("0", max_pixels=20_000)
    assert (path, read) == ("2", ["2", "1"])
    assert not judge_estimate(estimate).good


def test_reference_reads_are_read_once_kept_read_only_and_within_budget():
    from fractal_tasks.geometry import Box
    from fractal_tasks.registration.calculate import ReferenceReads

    reads = []

    def read(box):
        reads.append(box)
        return np.full(box.shape, len(reads), np.uint16)

    small, large = Box(("y", "x"), (0, 0), (4, 5)), Box(("y", "x"), (0, 0), (8, 8))
    cache = ReferenceReads(max_bytes=small.shape[0] * small.shape[1] * 2)
    at_2 = cache.reader("2", read)
    first = at_2(small)
    assert at_2(small) is first and reads == [small]
    assert not first.flags.writeable
    cache.reader("1", read)(small)  # another level: read again
    at_2(large), at_2(large)  # beyond the budget: read each time
    assert reads == [small, small, large, large]
