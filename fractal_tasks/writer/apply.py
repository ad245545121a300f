"""Write the registered image of one acquisition, then put it in place safely.

Everything is checked before anything is written. The new image is built in a
scratch directory next to the input (``<image>.registering``); only when it is
complete does it replace its destination, atomically (``writer.swap``). A run that
is killed leaves the user's image untouched and a scratch directory that the
next run deletes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zarr
from ngio import OmeZarrContainer, open_ome_zarr_container
from ngio.tables import ConditionTable, FeatureTable
from ngio.utils import NgioValueError

import fractal_tasks
from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError
from fractal_tasks.hcs.roi_tables import (
    load_paired_rois,
    slices_um,
    spatial_geometry,
)
from fractal_tasks.hcs.wells import (
    acquisition_of,
    add_image_to_well,
    open_well,
    reference_path,
    split_image_url,
)
from fractal_tasks.registration.geometry import (
    SPATIAL_AXES,
    ImageGeometry,
    window_pair,
)
from fractal_tasks.writer.pyramid import Aggregation, WindowPair, write_windows
from fractal_tasks.writer.swap import reading, recover, replace_directory

logger = logging.getLogger(__name__)

PROVENANCE_KEY = "fractal_tasks_registration"
SCRATCH_SUFFIX = ".registering"
REGISTERED_SUFFIX = "_registered"


@dataclass(frozen=True)
class ApplyPlan:
    """What one apply run reads and writes; built and checked before writing."""

    zarr_url: str
    reference_url: str
    well_url: str
    image_path: str
    destination: Path
    registered_roi_table: str
    acquisition: OmeZarrContainer
    reference: OmeZarrContainer
    image_pairs: list[WindowPair]
    label_pairs: dict[str, list[WindowPair]]
    tables: dict[str, str]  # table name -> URL of the image it is copied from
    overwrite_input: bool

    @property
    def scratch(self) -> Path:
        """Where the new image is built before it is put in place."""
        return self.destination.with_name(self.destination.name + SCRATCH_SUFFIX)

    @property
    def output_url(self) -> str:
        """URL of the registered image once in place."""
        return str(self.destination)


def _pairs(
    source_rois: dict, target_rois: dict, geometry: ImageGeometry, what: str
) -> list[WindowPair]:
    """Window pairs (acquisition -> reference) of every ROI, in one array's pixels."""
    pairs = []
    for name, target_roi in target_rois.items():
        try:
            source, target = window_pair(
                slices_um(source_rois[name]),
                slices_um(target_roi),
                geometry.pixel_um,
                geometry.shape,
            )
        except ValueError as error:
            raise RegistrationInputError(
                f"Registered ROI {name!r} does not fit {what}: {error}. Re-run "
                "'Find Registration Consensus' on this well."
            ) from error
        pairs.append(WindowPair(source, target))
    return pairs


def _read_tables(plan_acq, plan_ref, acq_url, ref_url) -> dict[str, str]:
    """Which image each table is copied from, every table checked readable.

    ROI tables come from the reference, every other table from the acquisition.
    """
    tables: dict[str, str] = {}
    sources = [(name, plan_ref, ref_url) for name in _roi_tables(plan_ref, ref_url)]
    skip = {name for name, _, _ in sources} | set(_roi_tables(plan_acq, acq_url))
    sources += [
        (name, plan_acq, acq_url) for name in plan_acq.list_tables() if name not in skip
    ]
    for name, container, url in sources:
        try:
            table = container.get_table(name)  # raises for an unreadable backend
        except (*MISSING_OR_MALFORMED, NgioValueError) as error:
            raise RegistrationInputError(
                f"Cannot read table {name!r} of {url!r}: {error}. Its backend must "
                "be one ngio reads (anndata, parquet, csv, json); convert or remove "
                "the table."
            ) from error
        tables[name] = url
        # measurements (by label) and conditions (by ROI name) stay true; only
        # coordinates in the acquisition's frame would now be wrong
        if (
            container is plan_acq
            and acq_url != ref_url
            and not isinstance(table, FeatureTable | ConditionTable)
        ):
            logger.warning(
                "Table %s is copied from %s without transformation: ROIs in it "
                "do not follow the registration.",
                name,
                acq_url,
            )
    return tables


def _roi_tables(container: OmeZarrContainer, url: str) -> list[str]:
    try:
        return container.list_tables(filter_types="roi_table")
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot list the tables of {url!r}: {error}. Repair its tables group."
        ) from error


def plan_apply(
    zarr_url: str,
    *,
    registered_roi_table: str,
    reference_acquisition: int,
    register_labels: bool,
    overwrite_input: bool,
) -> ApplyPlan:
    """Check the inputs of one apply run and read what it needs.

    Raises:
        RegistrationInputError: For any input that cannot be registered, with
            the fix; nothing has been written then.
    """
    zarr_url = zarr_url.rstrip("/")
    well_url, image_path = split_image_url(zarr_url)
    if image_path.endswith(SCRATCH_SUFFIX):
        raise RegistrationInputError(f"{zarr_url!r} is a scratch directory.")
    well = open_well(well_url)
    acquisition_of(well, well_url, image_path)
    ref_path = reference_path(well, well_url, image_path, reference_acquisition)
    reference_url = f"{well_url}/{ref_path}"
    destination = Path(
        zarr_url if overwrite_input else f"{zarr_url}{REGISTERED_SUFFIX}"
    )
    recover(destination)
    # the reference may be replaced by its own apply run meanwhile
    with reading(Path(reference_url)):
        acquisition = _open(zarr_url)
        reference = _open(reference_url)
        for container, url in ((acquisition, zarr_url), (reference, reference_url)):
            if registered_roi_table not in container.list_tables():
                raise RegistrationInputError(
                    f"Registered ROI table {registered_roi_table!r} not found in "
                    f"{url!r}. Run 'Calculate Registration (image-based)' and 'Find "
                    "Registration Consensus' before 'Apply Registration to Image', "
                    "and check the table name."
                )
        ref_rois, acq_rois = load_paired_rois(
            reference, acquisition, registered_roi_table, reference_url, zarr_url
        )
        geometry = spatial_geometry(acquisition.get_image())
        ref_geometry = spatial_geometry(reference.get_image())
        if geometry != ref_geometry:
            raise RegistrationInputError(
                f"{zarr_url!r} (pixel µm, shape {geometry}) and its reference "
                f"{reference_url!r} ({ref_geometry}) differ in pixel size or shape. "
                "Registration only shifts images of the same grid; resample or crop "
                "the acquisitions to the reference first."
            )
        image_pairs = _pairs(acq_rois, ref_rois, geometry, f"image {zarr_url!r}")
        label_pairs = {}
        if register_labels:
            for name in acquisition.list_labels():
                label = acquisition.get_label(name)
                label_geometry = spatial_geometry(label)
                _require_same_extent(label_geometry, geometry, name, zarr_url)
                label_pairs[name] = _pairs(
                    acq_rois,
                    ref_rois,
                    label_geometry,
                    f"label {name!r} of {zarr_url!r}",
                )
        if not overwrite_input and destination.exists():
            _require_ours(destination)
        tables = _read_tables(acquisition, reference, zarr_url, reference_url)
    return ApplyPlan(
        zarr_url=zarr_url,
        reference_url=reference_url,
        well_url=well_url,
        image_path=image_path,
        destination=destination,
        registered_roi_table=registered_roi_table,
        acquisition=acquisition,
        reference=reference,
        image_pairs=image_pairs,
        label_pairs=label_pairs,
        tables=tables,
        overwrite_input=overwrite_input,
    )


def _open(url: str) -> OmeZarrContainer:
    try:
        return open_ome_zarr_container(url)
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot open OME-Zarr image {url!r}: {error}. Check that it exists "
            "and is a valid OME-Zarr image."
        ) from error


def _require_same_extent(
    label: ImageGeometry, image: ImageGeometry, name: str, url: str
) -> None:
    """A label must cover the same physical extent as its image."""
    label_um = {a: n * label.pixel_um[a] for a, n in label.shape.items()}
    image_um = {a: n * image.pixel_um[a] for a, n in image.shape.items()}
    if set(label_um) != set(image_um) or any(
        abs(label_um[a] - image_um[a]) > label.pixel_um[a] for a in label_um
    ):
        raise RegistrationInputError(
            f"Label {name!r} of {url!r} covers {label_um} µm but its image covers "
            f"{image_um} µm; a label must match its image's shape. Re-create the "
            "label, or set register_labels=False."
        )


def _require_ours(destination: Path) -> None:
    """Refuse to replace an existing image that this package did not write."""
    try:
        attrs = zarr.open_group(str(destination), mode="r").attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, json.JSONDecodeError):
        attrs = {}  # not a zarr group (GroupNotFoundError), or a broken one
    if PROVENANCE_KEY not in attrs:
        raise RegistrationInputError(
            f"{str(destination)!r} exists and was not written by this task, so it "
            "is left untouched. Move or delete it, or run with "
            "overwrite_input=True."
        )


def _levels(container: OmeZarrContainer, getter) -> tuple[list, list]:
    """Arrays of every level, and the integer factor per axis between levels."""
    images = [getter(path) for path in container.level_paths]
    factors = []
    for above, below in zip(images, images[1:]):
        step = []
        for axis, n_above, n_below in zip(above.axes, above.shape, below.shape):
            if axis not in SPATIAL_AXES:
                step.append(1)
                continue
            ratio = getattr(below.pixel_size, axis) / getattr(above.pixel_size, axis)
            if (
                abs(ratio - round(ratio)) > 1e-6
                or -(-n_above // round(ratio)) < n_below
            ):
                return [i.zarr_array for i in images], []
            step.append(round(ratio))
        factors.append(tuple(step))
    return [i.zarr_array for i in images], factors


def _write(source, target_container, getter, pairs, kind: Aggregation, workers) -> None:
    """Write windows and pyramid of one image or label into its new container."""
    arrays, factors = _levels(target_container, getter)
    first = getter(target_container.level_paths[0])
    if len(factors) == len(arrays) - 1:
        write_windows(
            source, arrays, first.axes, pairs, factors, kind=kind, workers=workers
        )
        return
    # Pyramid steps that are not whole factors: let ngio interpolate them.
    write_windows(source, arrays[:1], first.axes, pairs, [], kind=kind, workers=workers)
    if kind == "mean":
        first.consolidate(order="linear", mode="auto")
    else:
        first.consolidate(mode="auto")


def _copy_tables(plan: ApplyPlan, scratch: Path) -> None:
    """Copy the tables' folders byte for byte, and list them in the new image.

    A folder copy keeps every column, dtype and backend exactly, and costs far
    less than decoding and re-encoding each table.
    """
    if not plan.tables:
        return
    version = zarr.open_group(str(scratch), mode="r").metadata.zarr_format
    group = zarr.open_group(str(scratch / "tables"), mode="a", zarr_format=version)
    with reading(Path(plan.reference_url)):
        for name, source_url in plan.tables.items():
            shutil.copytree(Path(source_url, "tables", name), scratch / "tables" / name)
    group.attrs["tables"] = list(plan.tables)


def write_registered(plan: ApplyPlan, workers: int) -> None:
    """Build the registered image in the plan's scratch directory."""
    scratch = plan.scratch
    shutil.rmtree(scratch, ignore_errors=True)  # leftover of a killed run
    started = time.perf_counter()
    new = plan.acquisition.derive_image(str(scratch), overwrite=True)
    # Tables are small files: copy them while the pixels are written.
    with ThreadPoolExecutor(1) as background:
        tables = background.submit(_copy_tables, plan, scratch)
        _write_pixels(plan, new, workers, started)
        tables.result()
    logger.info("Copied %d table(s): %s.", len(plan.tables), sorted(plan.tables))
    zarr.open_group(str(scratch), mode="r+").attrs[PROVENANCE_KEY] = {
        "source": plan.image_path,
        "reference": plan.reference_url.rsplit("/", 1)[-1],
        "registered_roi_table": plan.registered_roi_table,
        "version": fractal_tasks.__version__,
    }


def _write_pixels(
    plan: ApplyPlan, new: OmeZarrContainer, workers: int, started: float
) -> None:
    """Write the registered image and labels into the new container."""
    source = plan.acquisition.get_image()
    _write(
        source.zarr_array,
        new,
        lambda path: new.get_image(path=path),
        plan.image_pairs,
        "mean",
        workers,
    )
    logger.info(
        "Wrote %d window(s) of %s and its %d-level pyramid in %.2f s.",
        len(plan.image_pairs),
        plan.zarr_url,
        len(new.level_paths),
        time.perf_counter() - started,
    )
    for name, pairs in plan.label_pairs.items():
        started = time.perf_counter()
        label = plan.acquisition.get_label(name)
        new.derive_label(name, ref_image=label, overwrite=True)
        _write(
            label.zarr_array,
            new,
            lambda path, name=name: new.get_label(name, path=path),
            pairs,
            "nearest",
            workers,
        )
        logger.info(
            "Registered label %s in %.2f s.", name, time.perf_counter() - started
        )


def commit(plan: ApplyPlan) -> dict:
    """Put the registered image in place and report it to Fractal."""
    replace_directory(plan.scratch, plan.destination)
    logger.info("Registered image in place at %s.", plan.destination)
    if plan.overwrite_input:
        return {"image_list_updates": [{"zarr_url": plan.zarr_url}]}
    new_path = plan.destination.name
    well = open_well(plan.well_url)
    acquisition = acquisition_of(well, plan.well_url, plan.image_path)
    if add_image_to_well(plan.well_url, new_path, acquisition):
        logger.info("Added %s to the metadata of well %s.", new_path, plan.well_url)
    return {
        "image_list_updates": [{"zarr_url": plan.output_url, "origin": plan.zarr_url}]
    }
