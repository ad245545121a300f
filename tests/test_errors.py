"""Bad input: a clear error naming the problem and the fix; the plate unchanged."""

from pathlib import Path

import pytest
from _workflow import calculate, consensus, set_pixel_size, tree_hash, urls_of
from ngio import open_ome_zarr_container

from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.calculate_registration import calculate_registration
from fractal_tasks.find_consensus import find_consensus
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.init_calculate_registration import init_calculate_registration
from fractal_tasks.init_find_consensus import init_find_consensus
from fractal_tasks.registration.calculate import load_quality


def raises_unchanged(plate, match, call):
    before = tree_hash(plate.plate_url)
    with pytest.raises(RegistrationInputError, match=match):
        call()
    assert tree_hash(plate.plate_url) == before


def calc_args(plate, **extra):
    urls = urls_of(plate)
    return {
        "zarr_url": urls[1],
        "init_args": {"reference_zarr_url": urls[0]},
        "wavelength_id": "A01_C01",
        "level_path": "0",
        **extra,
    }


def test_missing_reference_acquisition(make_plate):
    plate = make_plate()
    raises_unchanged(
        plate,
        "no image of reference_acquisition=7",
        lambda: init_calculate_registration(
            zarr_urls=urls_of(plate), zarr_dir="x", reference_acquisition=7
        ),
    )


def test_missing_roi_table(make_plate):
    plate = make_plate()
    raises_unchanged(
        plate,
        "ROI table 'nope' not found.*Choose an existing table",
        lambda: calculate_registration(**calc_args(plate, input_roi_table="nope")),
    )


def test_unknown_wavelength(make_plate):
    plate = make_plate()
    raises_unchanged(
        plate,
        "No channel with wavelength id or label 'NOPE'.*A01_C01",
        lambda: calculate_registration(**{**calc_args(plate), "wavelength_id": "NOPE"}),
    )


def test_channel_by_label_works(make_plate):
    plate = make_plate()
    calculate_registration(**{**calc_args(plate), "wavelength_id": "DAPI"})
    container = open_ome_zarr_container(urls_of(plate)[1])
    quality = load_quality(container, "FOV_ROI_table")
    assert set(quality["registration_status"]) == {"ok"}


def test_missing_level(make_plate):
    plate = make_plate()
    raises_unchanged(
        plate,
        "level_path='9' does not exist.*Choose one of",
        lambda: calculate_registration(**{**calc_args(plate), "level_path": "9"}),
    )


@pytest.mark.parametrize("lower, upper", [(0.5, 0.5), (0.9, 0.1)])
def test_quantile_order(make_plate, lower, upper):
    plate = make_plate()
    raises_unchanged(
        plate,
        "must be below",
        lambda: calculate_registration(
            **calc_args(
                plate, lower_rescale_quantile=lower, upper_rescale_quantile=upper
            )
        ),
    )


@pytest.mark.parametrize("value", [-0.1, float("nan"), 1.5])
def test_quantile_range(make_plate, value):
    plate = make_plate()
    before = tree_hash(plate.plate_url)
    with pytest.raises(ValueError, match="lower_rescale_quantile"):
        calculate_registration(**calc_args(plate, lower_rescale_quantile=value))
    assert tree_hash(plate.plate_url) == before


def test_consensus_before_calculate(make_plate):
    plate = make_plate()
    urls = urls_of(plate)
    raises_unchanged(
        plate,
        "No translations.*Run 'Calculate Registration",
        lambda: find_consensus(zarr_url=urls[0], init_args={"zarr_url_list": urls}),
    )


def test_registered_table_equal_to_input(make_plate):
    plate = make_plate()
    urls = urls_of(plate)
    raises_unchanged(
        plate,
        "must differ from input_roi_table",
        lambda: find_consensus(
            zarr_url=urls[0],
            init_args={"zarr_url_list": urls},
            registered_roi_table="FOV_ROI_table",
        ),
    )


def test_apply_before_consensus(make_plate):
    plate = make_plate()
    calculate(plate)
    raises_unchanged(
        plate,
        "Run 'Calculate Registration.*'Find Registration Consensus' before",
        lambda: apply_registration_to_image(
            zarr_url=urls_of(plate)[1], registered_roi_table="FOV_ROI_table_registered"
        ),
    )


def test_not_an_hcs_image(make_plate, tmp_path):
    plate = make_plate()
    raises_unchanged(
        plate,
        "does not exist",
        lambda: apply_registration_to_image(
            zarr_url=str(tmp_path / "nowhere.zarr/A/01/0"),
            registered_roi_table="FOV_ROI_table_registered",
        ),
    )


def test_existing_foreign_registered_image_is_kept(make_plate):
    plate = make_plate()
    calculate(plate)
    consensus(plate)
    foreign = Path(urls_of(plate)[1] + "_registered")
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    raises_unchanged(
        plate,
        "was not written by this task",
        lambda: apply_registration_to_image(
            zarr_url=urls_of(plate)[1],
            overwrite_input=False,
            registered_roi_table="FOV_ROI_table_registered",
        ),
    )
    assert (foreign / "precious.txt").read_text() == "mine"


def _set_rois(url, table, change):
    """Rewrite a ROI table through ngio after ``change(rois) -> rois``."""
    from ngio.tables import RoiTable

    container = open_ome_zarr_container(url)
    rois = container.get_roi_table(table).rois()
    container.add_table(table, RoiTable(rois=change(rois)), overwrite=True)


def test_roi_names_differ(make_plate):
    plate = make_plate()
    url = urls_of(plate)[1]
    _set_rois(
        url,
        "FOV_ROI_table",
        lambda rois: [rois[0].model_copy(update={"name": "other"}), *rois[1:]],
    )
    raises_unchanged(
        plate,
        "does not hold the same ROI names.*missing \\['FOV_1'\\]",
        lambda: calculate_registration(**calc_args(plate)),
    )


def test_bad_image_late_in_a_group_writes_no_image_of_it(make_plate):
    # a well's images are registered in one call; the first is estimated
    # fine, the second has other ROI names: neither table may change
    plate = make_plate()
    urls = urls_of(plate)
    _set_rois(
        urls[2],
        "FOV_ROI_table",
        lambda rois: [rois[0].model_copy(update={"name": "other"}), *rois[1:]],
    )
    group = {"reference_zarr_url": urls[0], "other_zarr_urls": [urls[2]]}
    raises_unchanged(
        plate,
        f"{urls[2]}.*does not hold the same ROI names.*missing \\['FOV_1'\\]",
        lambda: calculate_registration(**calc_args(plate, init_args=group)),
    )


@pytest.mark.filterwarnings("ignore:Observation names are not unique:UserWarning")
def test_duplicate_roi_names(make_plate):
    import json

    import anndata

    plate = make_plate()
    folder = Path(urls_of(plate)[1], "tables", "FOV_ROI_table")
    meta = json.loads((folder / ".zattrs").read_text())
    table = anndata.read_zarr(folder)
    table.obs_names = ["FOV_1", "FOV_1", "FOV_3", "FOV_4"]
    table.write_zarr(folder)
    extra = json.loads((folder / ".zattrs").read_text())
    (folder / ".zattrs").write_text(json.dumps({**meta, **extra}))
    raises_unchanged(
        plate,
        "duplicate ROI names \\['FOV_1'\\].*unique",
        lambda: calculate_registration(**calc_args(plate)),
    )


def test_roi_outside_the_image(make_plate):
    plate = make_plate()
    for url in urls_of(plate)[:2]:
        _set_rois(
            url,
            "FOV_ROI_table",
            lambda rois: [
                r.update_slice("x", (1e4, 10.0)) if r.name == "FOV_2" else r
                for r in rois
            ],
        )
    raises_unchanged(
        plate,
        "ROI 'FOV_2' lies outside the image",
        lambda: calculate_registration(**calc_args(plate)),
    )


def test_nan_translation(make_plate):
    plate = make_plate()
    calculate(plate)
    _set_rois(
        urls_of(plate)[2],
        "FOV_ROI_table",
        lambda rois: [
            r.model_copy(update={"translation_y": float("nan")})
            if r.name == "FOV_3"
            else r
            for r in rois
        ],
    )
    urls = urls_of(plate)
    raises_unchanged(
        plate,
        "ROI 'FOV_3' has missing or NaN \\['translation_y'\\]",
        lambda: find_consensus(zarr_url=urls[0], init_args={"zarr_url_list": urls}),
    )


def test_empty_consensus_window(make_plate):
    plate = make_plate()
    calculate(plate)
    _set_rois(
        urls_of(plate)[1],
        "FOV_ROI_table",
        lambda rois: [
            r.model_copy(update={"translation_x": 500.0}) if r.name == "FOV_4" else r
            for r in rois
        ],
    )
    urls = urls_of(plate)
    raises_unchanged(
        plate,
        "ROI 'FOV_4': no region is visible in every acquisition",
        lambda: find_consensus(zarr_url=urls[0], init_args={"zarr_url_list": urls}),
    )


def _rewrite_image(url, **changes):
    """Replace an image by a copy of its data with other metadata."""
    from ngio import create_ome_zarr_from_array

    container = open_ome_zarr_container(url)
    image = container.get_image()
    options = dict(
        pixelsize=image.pixel_size.x,
        axes_names=image.axes,
        levels=len(container.level_paths),
        channels_meta=["A01_C01", "A01_C02"],
        consolidation_mode="auto",
        overwrite=True,
    )
    data = changes.pop("data", image.get_array())
    tables = {n: container.get_table(n) for n in container.list_tables()}
    for t in tables.values():
        t.dataframe  # noqa: B018  read before the image is replaced
    new = create_ome_zarr_from_array(url, data, **{**options, **changes})
    for name, table in tables.items():
        new.add_table(name, table, overwrite=True)


def test_pixel_sizes_differ(make_plate):
    plate = make_plate()
    _rewrite_image(urls_of(plate)[1], pixelsize=0.5)
    raises_unchanged(
        plate,
        "Pixel sizes differ.*resample",
        lambda: calculate_registration(**calc_args(plate)),
    )


@pytest.mark.parametrize("task", ["calculate", "consensus", "apply"])
def test_pixel_sizes_truly_differ(make_plate, task):
    # 0.65 vs 0.66 µm is a real difference, at every step that compares them
    plate = make_plate()
    urls = urls_of(plate)
    steps = ["calculate", "consensus", "apply"]
    if steps.index(task) > 0:
        calculate(plate)
    if steps.index(task) > 1:
        consensus(plate)
    set_pixel_size(urls[1], lambda s: s * 0.66 / 0.65)
    calls = {
        "calculate": lambda: calculate_registration(**calc_args(plate)),
        "consensus": lambda: find_consensus(
            zarr_url=urls[0], init_args={"zarr_url_list": urls}
        ),
        "apply": lambda: apply_registration_to_image(
            zarr_url=urls[1], registered_roi_table="FOV_ROI_table_registered"
        ),
    }
    raises_unchanged(plate, "0.65[,}'].*0.66[,}']|0.66[,}'].*0.65[,}']", calls[task])


def test_time_series_is_refused(make_plate):
    import numpy as np

    plate = make_plate(axes="tczyx", n_acquisitions=2)
    url = urls_of(plate)[1]
    data = open_ome_zarr_container(url).get_image().get_array()
    _rewrite_image(url, data=np.concatenate([data, data]))
    raises_unchanged(
        plate,
        "is a time series \\(2 time points\\)",
        lambda: calculate_registration(**calc_args(plate)),
    )


def test_label_shape_differs_from_image(make_plate):
    plate = make_plate()
    calculate(plate)
    consensus(plate)
    url = urls_of(plate)[1]
    container = open_ome_zarr_container(url)
    container.derive_label("nuclei", shape=(1, 40, 40), overwrite=True)
    raises_unchanged(
        plate,
        "Label 'nuclei'.*must match its image's shape",
        lambda: apply_registration_to_image(
            zarr_url=url, registered_roi_table="FOV_ROI_table_registered"
        ),
    )


def test_corrupt_well_metadata(make_plate):
    plate = make_plate()
    well = Path(plate.plate_url, "B", "03")
    (well / ".zattrs").write_text('{"well": {"images": "garbage"}}')
    raises_unchanged(
        plate,
        "has no valid OME-Zarr well metadata",
        lambda: init_calculate_registration(zarr_urls=urls_of(plate), zarr_dir="x"),
    )
    (well / ".zattrs").unlink()
    raises_unchanged(
        plate,
        "has no valid OME-Zarr well metadata",
        lambda: apply_registration_to_image(
            zarr_url=urls_of(plate)[1], registered_roi_table="FOV_ROI_table_registered"
        ),
    )


def test_unknown_table_backend(make_plate):
    import json

    plate = make_plate()
    calculate(plate)
    consensus(plate)
    url = urls_of(plate)[1]
    # ROI tables are copied from the reference: break the reference's
    attrs = Path(urls_of(plate)[0], "tables", "well_ROI_table", ".zattrs")
    meta = json.loads(attrs.read_text())
    attrs.write_text(json.dumps({**meta, "backend": "mystery_v9"}))
    raises_unchanged(
        plate,
        "Cannot read table 'well_ROI_table'.*backend",
        lambda: apply_registration_to_image(
            zarr_url=url, registered_roi_table="FOV_ROI_table_registered"
        ),
    )


def test_registered_roi_outside_the_image(make_plate):
    plate = make_plate()
    calculate(plate)
    consensus(plate)
    url = urls_of(plate)[1]
    _set_rois(
        url,
        "FOV_ROI_table_registered",
        lambda rois: [
            r.update_slice("y", (r["y"].start + 30.0, r["y"].length)) for r in rois
        ],
    )
    raises_unchanged(
        plate,
        "does not fit image.*Re-run 'Find Registration Consensus'",
        lambda: apply_registration_to_image(
            zarr_url=url, registered_roi_table="FOV_ROI_table_registered"
        ),
    )


def test_image_outside_an_hcs_well(tmp_path):
    import numpy as np
    from ngio import create_ome_zarr_from_array

    lone = tmp_path / "lone" / "images" / "img.zarr"
    create_ome_zarr_from_array(
        str(lone),
        np.zeros((32, 32), np.uint16),
        pixelsize=0.5,
        axes_names="yx",
        levels=1,
    )
    before = tree_hash(lone.parent)
    with pytest.raises(RegistrationInputError, match="no valid OME-Zarr well metadata"):
        apply_registration_to_image(
            zarr_url=str(lone), registered_roi_table="FOV_ROI_table_registered"
        )
    assert tree_hash(lone.parent) == before


@pytest.mark.parametrize(
    "version, zarr_io, overwrite_input",
    [
        ("0.4", False, True),
        ("0.4", False, False),
        ("0.5", False, True),
        ("0.5", True, True),
    ],
)
def test_truncated_chunk_file_stops_apply(
    make_plate, monkeypatch, version, zarr_io, overwrite_input
):
    import re

    import zarr

    from fractal_tasks.writer.chunk_io import ZARR_IO_ENV, chunk_file

    plate = make_plate(ngff_version=version)
    calculate(plate)
    consensus(plate)
    url = urls_of(plate)[1]
    array = zarr.open_array(f"{url}/0", mode="r")
    file = Path(chunk_file(array, (0,) * array.ndim))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    if zarr_io:
        monkeypatch.setenv(ZARR_IO_ENV, "1")
    raises_unchanged(
        plate,
        f"{re.escape(repr(str(file)))}.*Re-create or re-convert the image",
        lambda: apply_registration_to_image(
            zarr_url=url,
            registered_roi_table="FOV_ROI_table_registered",
            overwrite_input=overwrite_input,
        ),
    )
    well = Path(url).parent
    assert sorted(p.name for p in well.iterdir() if p.is_dir()) == ["0", "1", "2"]


@pytest.mark.parametrize("missing", ["2", "labels/nuclei/0"])
def test_missing_pyramid_level(make_plate, missing):
    import shutil

    plate = make_plate()
    calculate(plate)
    consensus(plate)
    url = urls_of(plate)[1]
    shutil.rmtree(Path(url, missing))
    broken = url if missing == "2" else f"{url}/labels/nuclei"
    match = f"'{broken}' lacks a pyramid level.*Re-create or re-convert it"
    raises_unchanged(
        plate,
        match,
        lambda: apply_registration_to_image(
            zarr_url=url, registered_roi_table="FOV_ROI_table_registered"
        ),
    )
    if missing == "2":
        raises_unchanged(
            plate, match, lambda: calculate_registration(**calc_args(plate))
        )
        raises_unchanged(
            plate,
            match,
            lambda: find_consensus(
                zarr_url=url, init_args={"zarr_url_list": urls_of(plate)}
            ),
        )


REMOTE = ["s3://bucket", "gs://bucket", "https://example.org/data", "file://"]


def _remote_calls(plate, prefix):
    urls = urls_of(plate)
    remote = [prefix + u for u in urls]
    return {
        "init_calculate": lambda: init_calculate_registration(
            zarr_urls=remote, zarr_dir=plate.plate_url
        ),
        "calculate": lambda: calculate_registration(
            **{**calc_args(plate), "zarr_url": remote[1]}
        ),
        "calculate_reference": lambda: calculate_registration(
            **{**calc_args(plate), "init_args": {"reference_zarr_url": remote[0]}}
        ),
        "init_consensus": lambda: init_find_consensus(
            zarr_urls=[urls[0], remote[1]], zarr_dir=plate.plate_url
        ),
        "consensus": lambda: find_consensus(
            zarr_url=urls[0], init_args={"zarr_url_list": [urls[0], remote[1]]}
        ),
        "apply": lambda: apply_registration_to_image(
            zarr_url=remote[1], registered_roi_table="FOV_ROI_table_registered"
        ),
    }


@pytest.mark.parametrize("prefix", REMOTE)
@pytest.mark.parametrize(
    "task",
    [
        "init_calculate",
        "calculate",
        "calculate_reference",
        "init_consensus",
        "consensus",
        "apply",
    ],
)
def test_remote_store_urls_are_refused(make_plate, task, prefix):
    plate = make_plate()  # refused before anything is read: no tables needed
    raises_unchanged(
        plate,
        "is not a file-system path.*local or mounted POSIX file system "
        "\\(e.g. NFS, GPFS, Lustre, CephFS\\)",
        _remote_calls(plate, prefix)[task],
    )
