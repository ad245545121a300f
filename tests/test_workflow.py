import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _workflow import (
    apply,
    calculate,
    consensus,
    expected_level0,
    expected_pyramid,
    register,
    set_pixel_size,
    spatial_index,
    urls_of,
    windows,
)
from conftest import plate_copy
from ngio import open_ome_zarr_container, open_ome_zarr_well
from ngio.tables import FeatureTable

from fractal_tasks.calculate_registration import calculate_registration
from fractal_tasks.init_calculate_registration import init_calculate_registration
from fractal_tasks.init_find_consensus import init_find_consensus
from fractal_tasks.registration.calculate import load_quality


def test_init_tasks_pair_images_with_their_reference(make_plate):
    plate = make_plate(wells=("B03", "C05"))
    urls = urls_of(plate)
    items = init_calculate_registration(zarr_urls=urls, zarr_dir="x")
    # one item per reference image: the well's other images are its group
    pairs = {
        url: i["init_args"]["reference_zarr_url"]
        for i in items["parallelization_list"]
        for url in [i["zarr_url"], *i["init_args"]["other_zarr_urls"]]
    }
    assert pairs == {
        u: u.rsplit("/", 1)[0] + "/0" for u in urls if not u.endswith("/0")
    }
    assert len(items["parallelization_list"]) == 2
    groups = init_find_consensus(zarr_urls=urls, zarr_dir="x")["parallelization_list"]
    assert [g["zarr_url"] for g in groups] == [u for u in urls if u.endswith("/0")]
    for group in groups:
        well = group["zarr_url"].rsplit("/", 1)[0]
        assert group["init_args"]["zarr_url_list"] == [f"{well}/{i}" for i in "012"]


def test_calculate_recovers_known_integer_shifts(make_plate):
    plate = make_plate()
    for item in calculate(plate):
        container = open_ome_zarr_container(item["zarr_url"])
        quality = load_quality(container, "FOV_ROI_table")
        for roi in container.get_roi_table("FOV_ROI_table").rois():
            true = plate.true_translation_px(item["zarr_url"], roi.name)
            found = [roi.model_extra[f"translation_{a}"] for a in "zyx"]
            found_px = np.array(found) / [1.0, plate.pixel_size, plate.pixel_size]
            # whole-pixel truth: the rounded estimate is exact
            np.testing.assert_array_equal(np.round(found_px), true)
            verdict = quality.loc[roi.name]
            assert verdict["registration_status"] == "ok"
            assert verdict["ncc_after"] >= verdict["ncc_before"]


def _check_registered(plate, output_of, source_of):
    """Pixels, labels and pyramids of every output equal the plain oracle."""
    for image in plate.images:
        out_url = output_of[image.zarr_url]
        out = open_ome_zarr_container(out_url)
        src = source_of[image.zarr_url]
        axes = src.get_image().axes
        acq_w = windows(out_url)  # ROI tables come from the reference ...
        ref_w = windows(out_url)
        acq_w = src_windows[image.zarr_url]
        expected = expected_level0(src.get_image().get_array(), axes, acq_w, ref_w)
        levels = expected_pyramid(expected, axes, len(out.level_paths), "mean")
        for path, want in zip(out.level_paths, levels):
            np.testing.assert_array_equal(out.get_image(path=path).get_array(), want)
        if src.list_labels():
            label = src.get_label("nuclei")
            lab_axes = label.axes
            want = expected_level0(label.get_array(), lab_axes, acq_w, ref_w)
            got = out.get_label("nuclei").get_array()
            np.testing.assert_array_equal(got, want)
            assert set(np.unique(got)) <= set(np.unique(label.get_array()))
            for path, w in zip(
                out.level_paths, expected_pyramid(want, lab_axes, 3, "nearest")
            ):
                np.testing.assert_array_equal(
                    out.get_label("nuclei", path=path).get_array(), w
                )


src_windows: dict = {}


def _register_and_check(plate, overwrite_input, calc_args=None):
    from shutil import copytree

    backup = plate.plate_url + ".orig"
    calculate(plate, **(calc_args or {}))
    consensus(plate)
    copytree(plate.plate_url, backup)
    src_windows.clear()
    for url in urls_of(plate):
        src_windows[url] = windows(url)
    updates = apply(plate, overwrite_input=overwrite_input)
    source_of = {
        u: open_ome_zarr_container(u.replace(plate.plate_url, backup))
        for u in urls_of(plate)
    }
    if overwrite_input:
        assert updates == [
            {"image_list_updates": [{"zarr_url": u}]} for u in urls_of(plate)
        ]
        output_of = {u: u for u in urls_of(plate)}
    else:
        assert updates == [
            {"image_list_updates": [{"zarr_url": f"{u}_registered", "origin": u}]}
            for u in urls_of(plate)
        ]
        output_of = {u: f"{u}_registered" for u in urls_of(plate)}
    # the reference's windows are where every acquisition lands
    ref_url = urls_of(plate)[0]
    for url in urls_of(plate):
        assert windows(output_of[url]) == src_windows[ref_url]
    _check_registered(plate, output_of, source_of)
    return output_of


@pytest.mark.parametrize("overwrite_input", [False, True])
def test_apply_writes_exactly_the_windows_and_pyramid(make_plate, overwrite_input):
    plate = make_plate()
    before = {
        u: open_ome_zarr_container(u).get_image().get_array() for u in urls_of(plate)
    }
    output_of = _register_and_check(plate, overwrite_input)
    well = open_ome_zarr_well(plate.plate_url + "/B/03")
    if overwrite_input:
        assert well.paths() == ["0", "1", "2"]
    else:
        assert well.paths() == [
            "0",
            "1",
            "2",
            "0_registered",
            "1_registered",
            "2_registered",
        ]
        for p in "012":
            assert well.get_image_acquisition_id(f"{p}_registered") == int(p)
    # inside every window, registration raises the correlation with the reference
    ref = open_ome_zarr_container(output_of[urls_of(plate)[0]])
    ref_dapi = ref.get_image().get_array()[0].astype(float)
    for url in urls_of(plate)[1:]:
        dapi = open_ome_zarr_container(output_of[url]).get_image().get_array()[0]
        for name, box in windows(output_of[url]).items():
            if not any(plate.true_translation_px(url, name)):
                continue
            a = ref_dapi[:, box["y"], box["x"]].ravel()
            b = dapi[:, box["y"], box["x"]].astype(float).ravel()
            c = before[url][0][:, box["y"], box["x"]].astype(float).ravel()
            assert np.corrcoef(a, b)[0, 1] > np.corrcoef(a, c)[0, 1] + 0.05
    leftovers = [
        p.name
        for p in Path(plate.plate_url, "B", "03").iterdir()
        if p.is_dir() and "." in p.name
    ]
    assert leftovers == []


@pytest.mark.parametrize(
    "axes, n_z, version",
    [
        ("yx", 1, "0.4"),
        ("cyx", 1, "0.5"),
        ("zyx", 3, "0.4"),
        ("czyx", 4, "0.5"),
        ("tczyx", 2, "0.4"),
        ("tyx", 1, "0.5"),
    ],
)
def test_axes_and_ngff_versions(make_plate, axes, n_z, version):
    plate = make_plate(axes=axes, n_z=n_z, ngff_version=version, n_acquisitions=2)
    _register_and_check(plate, overwrite_input=False)


def test_pixel_sizes_one_ulp_apart_register(make_plate):
    # 0.65 vs 0.6500000000000001: the same pixel size, from a converter's arithmetic
    plate = make_plate(n_acquisitions=2)
    url = urls_of(plate)[1]
    set_pixel_size(url, lambda s: math.nextafter(s, math.inf))
    image = open_ome_zarr_container(url).get_image()
    assert image.pixel_size.x == math.nextafter(0.65, math.inf)
    _register_and_check(plate, overwrite_input=False)


def test_tables_are_copied_from_the_right_image(make_plate):
    plate = make_plate()
    acq = open_ome_zarr_container(urls_of(plate)[1])
    acq.add_table(
        "nuclei_features",
        FeatureTable(
            pd.DataFrame({"label": [1, 2], "area": [10.0, 20.0]}),
            reference_label="nuclei",
        ),
        overwrite=True,
    )
    register(plate, apply_args={"overwrite_input": False})
    out = open_ome_zarr_container(urls_of(plate)[1] + "_registered")
    assert sorted(out.list_tables()) == [
        "FOV_ROI_table",
        "FOV_ROI_table_registered",
        "FOV_ROI_table_registration_quality",
        "nuclei_features",
        "well_ROI_table",
    ]
    features = out.get_table("nuclei_features").dataframe
    assert list(features["area"]) == [10.0, 20.0]
    # ROI tables come from the reference: no translation columns
    roi = out.get_roi_table("FOV_ROI_table").rois()[0]
    assert "translation_x" not in (roi.model_extra or {})


def test_a_group_gives_what_one_image_per_call_gives(tmp_path):
    # the grouped items of our init against fractal-tasks-core's shape of
    # item (one image per call), on two copies of one plate
    grouped, single = (plate_copy(tmp_path / k) for k in "ab")
    items = calculate(grouped)
    assert [len(i["init_args"]["other_zarr_urls"]) for i in items] == [1]
    urls = urls_of(single)
    for url in urls[1:]:
        calculate_registration(
            zarr_url=url,
            init_args={"reference_zarr_url": urls[0]},
            wavelength_id="A01_C01",
            level_path="0",
        )
    for a, b in zip(urls_of(grouped)[1:], urls[1:], strict=True):
        for table in ("FOV_ROI_table", "FOV_ROI_table_registration_quality"):
            pd.testing.assert_frame_equal(
                open_ome_zarr_container(a).get_table(table).dataframe,
                open_ome_zarr_container(b).get_table(table).dataframe,
            )
    assert (
        load_quality(open_ome_zarr_container(urls[2]), "FOV_ROI_table")[
            "registration_status"
        ]
        .eq("ok")
        .all()
    )


def test_every_task_twice_gives_the_same_result(make_plate):
    plate = make_plate()
    calculate(plate)
    first = (
        open_ome_zarr_container(urls_of(plate)[1]).get_table("FOV_ROI_table").dataframe
    )
    calculate(plate)
    again = (
        open_ome_zarr_container(urls_of(plate)[1]).get_table("FOV_ROI_table").dataframe
    )
    pd.testing.assert_frame_equal(first, again, check_like=True)
    consensus(plate)
    w1 = windows(urls_of(plate)[2])
    consensus(plate)
    assert windows(urls_of(plate)[2]) == w1
    apply(plate, overwrite_input=False)
    pixels = (
        open_ome_zarr_container(urls_of(plate)[2] + "_registered")
        .get_image()
        .get_array()
    )
    apply(plate, overwrite_input=False)
    well = open_ome_zarr_well(plate.plate_url + "/B/03")
    assert well.paths() == [
        "0",
        "1",
        "2",
        "0_registered",
        "1_registered",
        "2_registered",
    ]
    np.testing.assert_array_equal(
        open_ome_zarr_container(urls_of(plate)[2] + "_registered")
        .get_image()
        .get_array(),
        pixels,
    )
    apply(plate, overwrite_input=True)
    once = open_ome_zarr_container(urls_of(plate)[2]).get_image().get_array()
    np.testing.assert_array_equal(once, pixels)
    apply(plate, overwrite_input=True)
    np.testing.assert_array_equal(
        open_ome_zarr_container(urls_of(plate)[2]).get_image().get_array(), pixels
    )


def _texture_plate(make_plate):
    """A plate whose every FOV shows a real dense texture (scikit-image's grass)
    where the stage put it: acquisition pixel p shows what reference pixel
    p + translation shows (whole-pixel translations, so that apply, which
    moves whole pixels, can line the texture up exactly)."""
    from scipy import ndimage as ndi
    from skimage import data

    plate = make_plate(labels=False, fov_shape=(128, 160))
    texture = data.grass().astype(np.float64)
    rng = np.random.default_rng(0)
    for image_url in urls_of(plate):
        container = open_ome_zarr_container(image_url)
        image = container.get_image()
        array = np.zeros(image.shape, dtype=np.float64)
        for roi in container.get_roi_table("FOV_ROI_table").rois():
            y0 = int(round(roi["y"].start / plate.pixel_size))
            x0 = int(round(roi["x"].start / plate.pixel_size))
            h = int(round(roi["y"].length / plate.pixel_size))
            w = int(round(roi["x"].length / plate.pixel_size))
            _, ty, tx = plate.true_translation_px(image_url, roi.name)
            # 100 px margin: the texture is sampled around the FOV's place
            start = np.array([100 + y0 + ty, 100 + x0 + tx])
            whole = np.floor(start).astype(int)
            region = texture[whole[0] : whole[0] + h + 4, whole[1] : whole[1] + w + 4]
            moved = ndi.shift(region, -(start - whole), order=3, mode="nearest")
            counts = rng.poisson(100 + 12 * np.clip(moved[:h, :w], 0, None))
            array[..., y0 : y0 + h, x0 : x0 + w] = counts
        image.set_array(array.astype(image.dtype))
        image.consolidate(mode="auto")
    return plate


def _window_correlation(reference, moving, axes, box, dy, dx):
    """Correlation of a window (1 px inside) with the moving image's, moved."""
    inner = {
        a: slice(s.start + 1, s.stop - 1) if a in "yx" else s for a, s in box.items()
    }
    moved = {
        **inner,
        "y": slice(inner["y"].start + dy, inner["y"].stop + dy),
        "x": slice(inner["x"].start + dx, inner["x"].stop + dx),
    }
    a = reference[spatial_index(axes, inner)].astype(float).ravel()
    b = moving[spatial_index(axes, moved)].astype(float).ravel()
    return np.corrcoef(a, b)[0, 1]


def test_dense_texture_plate_through_the_three_tasks(make_plate):
    plate = _texture_plate(make_plate)
    register(
        plate,
        calc_args={"level_path": "2"},
        apply_args={"overwrite_input": False},
    )
    reference_url = urls_of(plate)[0]
    reference = open_ome_zarr_container(reference_url + "_registered")
    ref_pixels = reference.get_image().get_array()[0]
    for url in urls_of(plate)[1:]:
        container = open_ome_zarr_container(url)
        quality = load_quality(container, "FOV_ROI_table")
        assert set(quality["registration_status"]) == {"ok"}
        for roi in container.get_roi_table("FOV_ROI_table").rois():
            found = np.array([roi.model_extra[f"translation_{a}"] for a in "yx"])
            true = np.array(plate.true_translation_px(url, roi.name)[1:])
            assert np.abs(found / plate.pixel_size - true).max() < 0.5, roi.name
        # registered, the texture lines up with the reference's in every window:
        # the correlation is high, and lower one pixel off in any direction
        registered = open_ome_zarr_container(url + "_registered").get_image()
        acq_pixels = registered.get_array()[0]
        axes = registered.axes[1:]
        for name, box in windows(reference_url + "_registered").items():
            aligned = _window_correlation(ref_pixels, acq_pixels, axes, box, 0, 0)
            assert aligned > 0.8, name
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                off = _window_correlation(ref_pixels, acq_pixels, axes, box, dy, dx)
                assert off < aligned, (name, dy, dx)
