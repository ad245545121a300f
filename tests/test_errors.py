"""Bad input: a clear error naming the problem and the fix; the plate unchanged."""

import hashlib
from pathlib import Path

import pytest
from _workflow import calculate, consensus, urls_of
from ngio import open_ome_zarr_container

from fractal_tasks._errors import RegistrationInputError
from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.calculate_registration import calculate_registration
from fractal_tasks.find_consensus import find_consensus
from fractal_tasks.init_calculate_registration import init_calculate_registration


def tree_hash(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def raises_unchanged(plate, match, call):
    before = tree_hash(plate.plate_url)
    with pytest.raises(RegistrationInputError, match=match):
        call()
    assert tree_hash(plate.plate_url) == before


def calc_args(plate, **extra):
    urls = urls_of(plate)
    return dict(
        zarr_url=urls[1],
        init_args={"reference_zarr_url": urls[0]},
        wavelength_id="A01_C01",
        level_path="0",
        **extra,
    )


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
    roi = (
        open_ome_zarr_container(urls_of(plate)[1])
        .get_roi_table("FOV_ROI_table")
        .rois()[0]
    )
    assert roi.model_extra["registration_status"] == "ok"


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
