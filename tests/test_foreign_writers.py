"""Registration of plates written by ome-zarr-py and bioio-ome-zarr (issue #18).

The three tasks run once per (variant, overwrite_input) on a copy of a plate
from ``_foreign``; each test then checks one property of that run, so that one
failure does not hide the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zarr
from _foreign import (
    PIXEL_UM,
    VARIANTS,
    ForeignPlate,
    build_foreign_plate,
    chunk_files,
    metadata_files,
)
from _workflow import apply, calculate, consensus, windows
from ngio import open_ome_zarr_container

from fractal_tasks.hcs.swap import LOCK_SUFFIX
from fractal_tasks.writer.apply import PROVENANCE_KEY

MODES = {"replace": True, "new": False}  # id -> overwrite_input

OMEZARR_PY = [n for n, v in VARIANTS.items() if v.writer == "ome-zarr-py"]
BIOIO = [n for n, v in VARIANTS.items() if v.writer == "bioio"]
LABELED = [n for n, v in VARIANTS.items() if v.labels]
CONSOLIDATED = [n for n, v in VARIANTS.items() if v.consolidated]


def cases(variants=None, modes=None) -> list:
    """Parameters (variant, mode) of one test."""
    return [
        pytest.param(variant, mode, id=f"{variant}-{mode}")
        for variant in variants or VARIANTS
        for mode in modes or MODES
    ]


# --------------------------------------------------------------------------
# One run of the workflow per (variant, mode), shared by the tests
# --------------------------------------------------------------------------


@dataclass
class Run:
    plate: ForeignPlate
    overwrite: bool
    # image path -> its input, read before Apply
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    labels: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    translations_px: dict[str, dict[str, tuple[float, float]]] = field(
        default_factory=dict
    )
    windows: dict[str, dict[str, dict]] = field(default_factory=dict)
    metadata_before: dict[str, bytes] = field(default_factory=dict)
    chunks_before: dict[str, bytes] = field(default_factory=dict)
    error: BaseException | None = None

    def out_path(self, path: str) -> str:
        return path if self.overwrite else f"{path}_registered"

    def out_url(self, path: str) -> str:
        return f"{self.plate.well_url}/{self.out_path(path)}"

    def require(self) -> None:
        if self.error is not None:
            raise self.error


_TEMPLATES: dict[str, ForeignPlate] = {}  # as the writer left them (+ tables)
_CALCULATED: dict[str, ForeignPlate | BaseException] = {}  # + Calculate, Consensus
_RUNS: dict[tuple[str, str], Run] = {}


def _template(name: str, root: Path) -> ForeignPlate:
    if name not in _TEMPLATES:
        _TEMPLATES[name] = build_foreign_plate(
            root / "templates" / f"{name}.zarr", VARIANTS[name]
        )
    return _TEMPLATES[name]


def _registration_channel(plate: ForeignPlate) -> str:
    # bioio's omero channels have no wavelength_id: register by channel label
    return "A01_C01" if plate.variant.writer == "ome-zarr-py" else "DAPI"


def _calculated(name: str, root: Path) -> ForeignPlate | BaseException:
    """The plate after Calculate and Consensus (once per variant)."""
    if name not in _CALCULATED:
        plate = _template(name, root).copy_to(root / "calculated" / f"{name}.zarr")
        try:
            calculate(
                plate,
                wavelength_id=_registration_channel(plate),
                level_path=plate.level_paths[0],
            )
            consensus(plate)
            _CALCULATED[name] = plate
        except Exception as error:
            _CALCULATED[name] = error
    return _CALCULATED[name]


def _read_input(run: Run) -> None:
    for image in run.plate.images:
        run.arrays[image.path] = {
            p: zarr.open_array(f"{image.zarr_url}/{p}", mode="r")[...]
            for p in run.plate.level_paths
        }
        run.labels[image.path] = {
            name: [
                zarr.open_array(f"{image.zarr_url}/labels/{name}/{p}", mode="r")[...]
                for p in level_paths(f"{image.zarr_url}/labels/{name}")
            ]
            for name in run.plate.label_levels
        }
        container = open_ome_zarr_container(image.zarr_url, mode="r")
        run.translations_px[image.path] = {
            roi.name: tuple(
                roi.model_extra.get(f"translation_{a}", 0.0) / PIXEL_UM for a in "yx"
            )
            for roi in container.get_roi_table("FOV_ROI_table").rois()
        }
        run.windows[image.path] = windows(image.zarr_url)


def _run(variant: str, mode: str, root: Path) -> Run:
    key = (variant, mode)
    if key in _RUNS:
        return _RUNS[key]
    calculated = _calculated(variant, root)
    if isinstance(calculated, BaseException):
        run = Run(plate=_template(variant, root), overwrite=MODES[mode])
        run.error = calculated
        _RUNS[key] = run
        return run
    plate = calculated.copy_to(root / variant / mode / "plate.zarr")
    run = Run(plate=plate, overwrite=MODES[mode])
    _RUNS[key] = run
    try:
        _read_input(run)
        run.metadata_before = metadata_files(plate.plate_url)
        run.chunks_before = chunk_files(plate.plate_url)
        apply(plate, overwrite_input=run.overwrite)
    except Exception as error:  # each test reports it as its own failure
        run.error = error
    return run


@pytest.fixture
def run(variant, mode, tmp_path_factory) -> Run:
    return _run(variant, mode, _root(tmp_path_factory))


_ROOT: list[Path] = []


def _root(tmp_path_factory) -> Path:
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("foreign"))
    return _ROOT[0]


# --------------------------------------------------------------------------
# Reading metadata as written on disk
# --------------------------------------------------------------------------


def group_attrs(url: str) -> dict:
    path = Path(url)
    if (path / "zarr.json").exists():
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    if (path / ".zattrs").exists():
        return json.loads((path / ".zattrs").read_text())
    return {}


def ome(url: str) -> dict:
    attrs = group_attrs(url)
    return attrs["ome"] if "ome" in attrs else attrs


def array_metadata(url: str) -> dict:
    path = Path(url)
    if (path / "zarr.json").exists():
        return json.loads((path / "zarr.json").read_text())
    return json.loads((path / ".zarray").read_text())


def level_paths(url: str) -> list[str]:
    return [d["path"] for d in ome(url)["multiscales"][0]["datasets"]]


def label_names(url: str) -> list[str]:
    return ome(f"{url}/labels").get("labels", [])


def differences(got, want, where: str = "") -> list[str]:
    """Where two JSON documents differ, e.g. ``['/omero/id: missing']``."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(got) | set(want), key=str):
            if key not in got:
                out.append(f"{where}/{key}: missing")
            elif key not in want:
                out.append(f"{where}/{key}: added")
            else:
                out += differences(got[key], want[key], f"{where}/{key}")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [
            d
            for i, (g, w) in enumerate(zip(got, want))
            for d in differences(g, w, f"{where}/{i}")
        ]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _without_provenance(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k != PROVENANCE_KEY}


# --------------------------------------------------------------------------
# Registration itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant, mode", cases())
def test_translations_are_the_known_shifts(run):
    run.require()
    for image in run.plate.images:
        found = run.translations_px[image.path]
        true = run.plate.shifts_px[image.path]
        assert set(found) == set(true)
        for name, shift in true.items():
            np.testing.assert_allclose(found[name], shift, atol=0.05, err_msg=name)


@pytest.mark.parametrize("variant, mode", cases())
def test_registered_acquisitions_equal_the_registered_reference(run):
    run.require()
    reference = run.plate.images[0]
    ref_w = run.windows[reference.path]
    source = run.arrays[reference.path][run.plate.level_paths[0]]
    want = np.zeros_like(source)
    for box in ref_w.values():
        index = (..., box["y"], box["x"])
        want[index] = source[index]
    for image in run.plate.images:
        url = run.out_url(image.path)
        got = zarr.open_array(f"{url}/{run.plate.level_paths[0]}", mode="r")[...]
        np.testing.assert_array_equal(got, want, err_msg=image.path)
        for path in run.plate.level_paths[1:]:
            ref_level = zarr.open_array(
                f"{run.out_url(reference.path)}/{path}", mode="r"
            )[...]
            level = zarr.open_array(f"{url}/{path}", mode="r")[...]
            np.testing.assert_array_equal(level, ref_level, err_msg=path)
            assert level.any(), path


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant, mode", cases(LABELED))
def test_every_label_image_is_kept(run):
    run.require()
    for _, before, after in _inputs(run):
        assert sorted(label_names(before)) == sorted(run.plate.label_levels)
        assert label_names(after) == label_names(before)


def _input_copy(run: Run, image) -> str:
    return f"{_TEMPLATES[run.plate.variant.name].plate_url}/A/1/{image.path}"


@pytest.mark.parametrize("variant, mode", cases(LABELED))
def test_labels_are_registered_without_new_values(run):
    run.require()
    ref = run.plate.images[0]
    for name in run.plate.label_levels:
        source = run.labels[ref.path][name][0]
        want = np.zeros_like(source)
        for box in run.windows[ref.path].values():
            index = (..., box["y"], box["x"])
            want[index] = source[index]
        for image in run.plate.images:
            url = f"{run.out_url(image.path)}/labels/{name}"
            assert Path(url).is_dir(), f"{url} is missing"
            got = zarr.open_array(f"{url}/{level_paths(url)[0]}", mode="r")[...]
            np.testing.assert_array_equal(got, want, err_msg=f"{image.path} {name}")
            values = set(np.unique(got))
            assert values <= set(np.unique(run.labels[image.path][name][0]))


@pytest.mark.parametrize("variant, mode", cases(LABELED))
def test_label_pyramid_keeps_its_own_levels(run):
    run.require()
    for image in run.plate.images:
        for name, n_levels in run.plate.label_levels.items():
            url = f"{run.out_url(image.path)}/labels/{name}"
            assert Path(url).is_dir(), f"{url} is missing"
            inputs = run.labels[image.path][name]
            assert len(inputs) == n_levels
            assert len(level_paths(url)) == n_levels, name
            for path, source in zip(level_paths(url), inputs):
                level = zarr.open_array(f"{url}/{path}", mode="r")[...]
                assert level.shape == source.shape, (name, path)
                assert level.any() or not source.any(), (name, path, "all zero")


# --------------------------------------------------------------------------
# Metadata kept
# --------------------------------------------------------------------------


def _inputs(run: Run):
    """(image, input url as it was, output url) for every image."""
    for image in run.plate.images:
        yield image, _input_copy(run, image), run.out_url(image.path)


@pytest.mark.parametrize("variant, mode", cases(modes=["new"]))
def test_calculate_and_consensus_keep_the_writers_metadata(run):
    """Only tables may change before Apply."""
    run.require()
    written = _TEMPLATES[run.plate.variant.name].metadata
    changed = [
        k
        for k, v in written.items()
        if "/tables/" not in k and run.metadata_before.get(k) != v
    ]
    assert changed == []


@pytest.mark.parametrize("variant, mode", cases())
def test_omero_is_kept(run):
    run.require()
    for _, before, after in _inputs(run):
        assert differences(ome(after).get("omero"), ome(before)["omero"]) == []


@pytest.mark.parametrize("variant, mode", cases())
def test_multiscales_are_kept(run):
    """Axes, level names, scale and translation per level, root transforms."""
    run.require()
    for _, before, after in _inputs(run):
        assert differences(ome(after)["multiscales"], ome(before)["multiscales"]) == []
        for name in label_names(before):
            got = ome(f"{after}/labels/{name}").get("multiscales")
            want = ome(f"{before}/labels/{name}")["multiscales"]
            assert differences(got, want, name) == []


@pytest.mark.parametrize("variant, mode", cases())
def test_array_layout_is_kept(run):
    """dtype, chunks, shards, codecs / compressor, fill value, key encoding."""
    run.require()
    for _, before, after in _inputs(run):
        groups = [""] + [f"labels/{n}" for n in label_names(before)]
        for group in groups:
            for path in level_paths(f"{before}/{group}"):
                want = array_metadata(f"{before}/{group}/{path}")
                got = array_metadata(f"{after}/{group}/{path}")
                assert differences(got, want, f"{group}/{path}") == []


@pytest.mark.parametrize("variant, mode", cases())
def test_image_and_label_attributes_are_kept(run):
    """Every attribute of the image, labels and label groups (my_lab, colors)."""
    run.require()
    for _, before, after in _inputs(run):
        got = _without_provenance(group_attrs(after))
        assert differences(got, group_attrs(before)) == []
        for group in ["labels"] * bool(label_names(before)) + [
            f"labels/{name}" for name in label_names(before)
        ]:
            got, want = (
                group_attrs(f"{after}/{group}"),
                group_attrs(f"{before}/{group}"),
            )
            assert differences(got, want, group) == []


@pytest.mark.parametrize("variant, mode", cases())
def test_unknown_subgroup_is_kept_byte_for_byte(run):
    run.require()
    for _, before, after in _inputs(run):
        assert Path(after, "extra").is_dir(), f"{after}/extra is missing"
        for files in (metadata_files, chunk_files):
            want = files(f"{before}/extra")
            assert want and files(f"{after}/extra") == want


@pytest.mark.parametrize("variant, mode", cases(modes=["new"]))
def test_input_is_unchanged_when_not_overwritten(run):
    run.require()
    well = "A/1"
    now_meta = metadata_files(run.plate.plate_url)
    now_chunks = chunk_files(run.plate.plate_url)
    well_meta = {f"{well}/.zattrs", f"{well}/zarr.json"}

    def original(key: str) -> bool:  # not in a new image, nor a lock file
        parts = key.split("/")
        new = len(parts) > 3 and parts[2].endswith("_registered")
        locks = ".ngio-locks" in key or key.endswith(LOCK_SUFFIX)
        return not new and not locks

    refreshed = {".zmetadata"}  # consolidated at the root: the well gained an image
    changed = [
        k
        for k, v in run.metadata_before.items()
        if k not in well_meta | refreshed and now_meta.get(k) != v
    ]
    assert changed == []
    for key in refreshed & set(run.metadata_before):
        # refreshed, not stale: every attribute file is consolidated as on disk
        old, now = (
            json.loads(m[key])["metadata"] for m in (run.metadata_before, now_meta)
        )
        assert set(old) <= set(now)
        attributes = {k for k in now if k.endswith(".zattrs")}
        assert {k: now[k] for k in attributes} == {
            k: json.loads(now_meta[k]) for k in attributes
        }
    assert {k for k in now_meta if original(k)} == set(run.metadata_before)
    assert [k for k, v in run.chunks_before.items() if now_chunks.get(k) != v] == []
    assert {k for k in now_chunks if original(k)} == {
        k for k in run.chunks_before if original(k)
    }


# --------------------------------------------------------------------------
# Other readers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant, mode", cases(OMEZARR_PY))
def test_output_reads_with_ome_zarr_py(run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    run.require()
    for image, _before, after in _inputs(run):
        nodes = list(Reader(parse_url(after))())
        image_node = nodes[0]
        assert image_node.load(Multiscales) is not None
        want = [a.shape for a in run.arrays[image.path].values()]
        assert [tuple(d.shape) for d in image_node.data] == want
        got = np.asarray(image_node.data[0])
        out = zarr.open_array(f"{after}/{run.plate.level_paths[0]}", mode="r")[...]
        np.testing.assert_array_equal(got, out)
        labels = {
            n.zarr.path.rstrip("/").rsplit("/", 1)[-1]: n
            for n in nodes
            if n.load(Label) is not None
        }
        assert sorted(labels) == sorted(run.plate.label_levels)
        for name, node in labels.items():
            assert len(node.data) == run.plate.label_levels[name], name


@pytest.mark.parametrize("variant, mode", cases(BIOIO))
def test_output_reads_with_bioio(run):
    from bioio import BioImage
    from bioio_ome_zarr import Reader

    run.require()
    for _image, before, after in _inputs(run):
        was, now = BioImage(before, reader=Reader), BioImage(after, reader=Reader)
        assert now.dims.shape == was.dims.shape
        assert now.channel_names == was.channel_names == ["DAPI", "GFP"]
        assert now.physical_pixel_sizes == was.physical_pixel_sizes
        assert len(now.resolution_levels) == len(was.resolution_levels)
        level0 = zarr.open_array(f"{after}/0", mode="r")[...]
        data = np.asarray(now.get_image_data(run.plate.variant.axes.upper()))
        np.testing.assert_array_equal(data, level0.reshape(data.shape))


VALIDATE = """
import json, sys
import zarr
from ome_zarr_models import v04, v05
models = {"0.4": v04, "0.5": v05}[sys.argv[1]]
out = {}
for kind, path in json.loads(sys.argv[2]):
    try:
        getattr(models, kind).from_zarr(zarr.open_group(path, mode="r"))
        out[path] = "ok"
    except Exception as error:
        out[path] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def validate(version: str, checks: list[tuple[str, str]]) -> dict[str, str]:
    """ome-zarr-models' verdict per path, in a process without ngio."""
    done = subprocess.run(
        [sys.executable, "-c", VALIDATE, version, json.dumps(checks)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("variant, mode", cases())
def test_output_validates_where_the_input_did(run):
    run.require()
    verdict = _verdicts(run.plate.variant.name)
    for kind, before, after in _validation_pairs(run):
        if verdict[before] != "ok":
            continue
        if kind in ("Well", "HCS") and verdict[after] != "ok":
            # NGFF allows only alphanumeric image paths in a well
            assert not run.overwrite
            assert "String should match pattern '^[a-zA-Z0-9]*$'" in verdict[after]
            continue
        assert verdict[after] == "ok", (after, verdict[after])


def _validation_pairs(run: Run) -> list[tuple[str, str, str]]:
    """(model, input path, output path) of every group to validate."""
    pairs = []
    for _, before, after in _inputs(run):
        pairs.append(("Image", before, after))
        for name in label_names(before):
            pairs.append(
                ("ImageLabel", f"{before}/labels/{name}", f"{after}/labels/{name}")
            )
    template = _TEMPLATES[run.plate.variant.name]
    pairs.append(("Well", template.well_url, run.plate.well_url))
    pairs.append(("HCS", template.plate_url, run.plate.plate_url))
    return pairs


_VERDICTS: dict[str, dict[str, str]] = {}


def _verdicts(variant: str) -> dict[str, str]:
    """Verdicts of both modes' runs of a variant, from one validator process."""
    if variant not in _VERDICTS:
        runs = [_run(variant, mode, _ROOT[0]) for mode in MODES]
        checks = {
            (kind, path)
            for run in runs
            if run.error is None
            for kind, *paths in _validation_pairs(run)
            for path in paths
        }
        _VERDICTS[variant] = validate(VARIANTS[variant].ngff, sorted(checks))
    return _VERDICTS[variant]


@pytest.mark.parametrize("variant, mode", cases(CONSOLIDATED))
def test_consolidated_plate_reads_the_registered_arrays(run):
    run.require()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = zarr.open_group(run.plate.plate_url, mode="r")  # consolidated
    well = root["A/1"]
    paths = [i["path"] for i in well.attrs["well"]["images"]]
    for image in run.plate.images:
        out = run.out_path(image.path)
        assert out in paths
        for path in run.plate.level_paths:
            array = root[f"A/1/{out}/{path}"]
            on_disk = zarr.open_array(f"{run.out_url(image.path)}/{path}", mode="r")
            assert array.shape == on_disk.shape
            np.testing.assert_array_equal(array[...], on_disk[...])
