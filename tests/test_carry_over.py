"""Apply carries over everything it does not register, and never writes the input."""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from _workflow import apply, calculate, consensus, urls_of

from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.images import label_names
from fractal_tasks.hcs.swap import LOCK_SUFFIX
from fractal_tasks.writer.image_tree import (
    METADATA_FILES,
    copy_skeleton,
    has_consolidated_metadata,
    refresh_consolidated_metadata,
)


def _files(root):
    root = Path(root)
    return {
        str(f.relative_to(root)): hashlib.sha1(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and not f.name.endswith(LOCK_SUFFIX)  # the replace's locks
    }


def _metadata(root):
    return {k: v for k, v in _files(root).items() if Path(k).name in METADATA_FILES}


def test_copy_skeleton_empties_arrays_and_leaves_out_folders(tmp_path):
    source = tmp_path / "image"
    root = zarr.open_group(str(source), mode="w", zarr_format=2)
    root.attrs["my_lab"] = {"kept": True}
    root.create_array("0", shape=(4, 4), chunks=(2, 2), dtype="u2")[:] = 7
    root.create_array("extra/a", shape=(2,), chunks=(1,), dtype="u1")[:] = 3
    root.create_group("labels").create_array("x", shape=(2,), dtype="u1")[:] = 1
    target = tmp_path / "copy"
    copy_skeleton(source, target, emptied=["0"], left_out=["labels"])
    assert sorted(p.name for p in (target / "0").iterdir()) == [".zarray", ".zattrs"]
    assert not (target / "labels").exists()
    copied = zarr.open_group(str(target), mode="r")
    assert copied.attrs["my_lab"] == {"kept": True}
    assert not copied["0"][:].any()  # every chunk unwritten: the fill value
    assert copied["0"].chunks == (2, 2)
    np.testing.assert_array_equal(copied["extra/a"][:], [3, 3])
    unchanged = {k: v for k, v in _files(source).items() if not k.startswith("0/")}
    assert {k: v for k, v in _files(target).items() if not k.startswith("0/")} == {
        k: v for k, v in unchanged.items() if not k.startswith("labels")
    }


@pytest.mark.parametrize("version", [2, 3])
def test_consolidated_metadata_is_refreshed_only_where_it_was(tmp_path, version):
    plain = zarr.open_group(str(tmp_path / "plain"), mode="w", zarr_format=version)
    plain.create_array("a", shape=(2,), dtype="u1")
    assert not refresh_consolidated_metadata(tmp_path / "plain")
    assert not has_consolidated_metadata(tmp_path / "plain")
    group = zarr.open_group(str(tmp_path / "c"), mode="w", zarr_format=version)
    group.create_array("a", shape=(2,), dtype="u1")
    zarr.consolidate_metadata(str(tmp_path / "c"), zarr_format=version)
    group.create_array("b", shape=(5,), dtype="u1")
    stale = zarr.open_group(str(tmp_path / "c"), mode="r", use_consolidated=True)
    assert "b" not in stale
    assert refresh_consolidated_metadata(tmp_path / "c")
    fresh = zarr.open_group(str(tmp_path / "c"), mode="r", use_consolidated=True)
    assert fresh["b"].shape == (5,)


def test_label_names_read_without_version(tmp_path):
    group = zarr.open_group(str(tmp_path / "img"), mode="w", zarr_format=3)
    group.create_group("labels").attrs["ome"] = {"labels": ["cells", "nuclei"]}
    assert label_names(str(tmp_path / "img")) == ["cells", "nuclei"]
    assert label_names(str(tmp_path / "none")) == []
    v2 = zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    v2.create_group("labels").attrs["labels"] = ["nuclei"]
    assert label_names(str(tmp_path / "v2")) == ["nuclei"]
    v2["labels"].attrs["labels"] = "nuclei"
    with pytest.raises(RegistrationInputError, match="must be a list"):
        label_names(str(tmp_path / "v2"))


@pytest.fixture
def registered_plate(make_plate):
    plate = make_plate()
    calculate(plate)
    consensus(plate)
    return plate


def test_unknown_groups_attributes_and_omero_are_carried_over(registered_plate):
    plate = registered_plate
    url = urls_of(plate)[1]
    image = zarr.open_group(url, mode="r+")
    image.attrs["my_lab"] = {"operator": "A. N. Other", "run": 3}
    extra = image.create_group("extra")
    extra.attrs["note"] = "unknown to the task"
    extra.create_array("mask", shape=(3,), dtype="u1")[:] = [1, 2, 3]
    before = _metadata(url)
    apply(plate, overwrite_input=True)
    after = zarr.open_group(url, mode="r")
    assert after.attrs["my_lab"] == {"operator": "A. N. Other", "run": 3}
    assert after.attrs["omero"] == image.attrs["omero"]
    assert after.attrs["multiscales"] == image.attrs["multiscales"]
    np.testing.assert_array_equal(after["extra/mask"][:], [1, 2, 3])
    now = _metadata(url)
    # every metadata file is the input's, but for the provenance in .zattrs and
    # the ROI tables, which come from the reference
    changed = sorted(k for k in before if now.get(k) != before[k])
    assert [k for k in changed if not k.startswith("tables/")] == [".zattrs"]
    for level in ("0", "1", "2"):
        assert (Path(url, level, ".zarray")).is_file()


def test_input_is_never_written_without_overwrite(registered_plate):
    plate = registered_plate
    url = urls_of(plate)[1]
    before = _files(url)
    apply(plate, overwrite_input=False)
    assert _files(url) == before
    assert Path(f"{url}_registered", "labels", "nuclei").is_dir()


def test_register_labels_false_refuses_to_drop_labels(registered_plate):
    plate = registered_plate
    url = urls_of(plate)[1]
    before = _files(plate.plate_url)
    with pytest.raises(RegistrationInputError, match="would drop the label"):
        apply_registration_to_image(
            zarr_url=url,
            registered_roi_table="FOV_ROI_table_registered",
            register_labels=False,
        )
    assert _files(plate.plate_url) == before


def test_register_labels_false_next_to_the_input_keeps_them_there(registered_plate):
    plate = registered_plate
    url = urls_of(plate)[1]
    apply_registration_to_image(
        zarr_url=url,
        registered_roi_table="FOV_ROI_table_registered",
        register_labels=False,
        overwrite_input=False,
    )
    assert not Path(f"{url}_registered", "labels").exists()
    assert label_names(url) == ["nuclei"]


def test_plate_consolidated_metadata_is_refreshed(registered_plate):
    plate = registered_plate
    with warnings.catch_warnings():
        # our lock files beside tables are no zarr nodes, and zarr says so
        warnings.filterwarnings("ignore", "Object at .* is not recognized")
        zarr.consolidate_metadata(plate.plate_url, zarr_format=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply(plate, overwrite_input=False)
    assert [str(w.message) for w in caught] == []
    root = zarr.open_group(plate.plate_url, mode="r")  # zarr's default: consolidated
    for url in urls_of(plate):
        relative = Path(url).relative_to(plate.plate_url).as_posix()
        new = root[f"{relative}_registered/0"]
        on_disk = zarr.open_array(f"{url}_registered/0", mode="r")
        np.testing.assert_array_equal(new[:], on_disk[:])
    well = json.loads(Path(plate.plate_url, "B", "03", ".zattrs").read_text())
    listed = root["B/03"].attrs["well"]["images"]
    assert listed == well["well"]["images"]
