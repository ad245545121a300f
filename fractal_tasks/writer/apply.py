"""Write the registered image of one acquisition, then put it in place safely.

Everything is checked before anything is written, and the input is only ever
opened read-only. The new image is built in a scratch directory next to the
input (``<well>/.registering/<image>``): a copy of the input's folder in which the
image's and the labels' arrays start empty with their own metadata
(``writer.image_tree``), then receive the registered pixels. Only when it is
complete does it replace its destination (``hcs.swap``). A run that is
killed or fails leaves the user's image untouched; a failed run removes its
scratch directory, a killed run's is deleted by the next run.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ngio
import zarr
from ngio import OmeZarrContainer
from ngio.tables import ConditionTable, FeatureTable
from ngio.utils import NgioValueError

import fractal_tasks
from fractal_tasks.geometry import (
    SPATIAL_AXES,
    ImageGeometry,
    RigidTransform,
    at_most,
    same_value,
    window_pair,
)
from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError
from fractal_tasks.hcs.images import label_names, open_image, open_label_levels
from fractal_tasks.hcs.roi_tables import (
    load_paired_rois,
    load_transforms,
    motion_in_pixels,
    slices_um,
    spatial_geometry,
    transform_table_name,
)
from fractal_tasks.hcs.swap import (
    reading,
    recover,
    replace_directory,
    updating,
)
from fractal_tasks.hcs.wells import (
    acquisition_of,
    add_image_to_well,
    open_well,
    reference_path,
    split_image_url,
)
from fractal_tasks.writer.image_tree import copy_skeleton, refresh_consolidated_metadata
from fractal_tasks.writer.pyramid import Aggregation, WindowPair, write_windows

logger = logging.getLogger(__name__)

PROVENANCE_KEY = "fractal_tasks_registration"
# A folder without zarr metadata: zarr neither lists nor consolidates what is
# in it, so a half-built image never shows in a plate's consolidated metadata.
SCRATCH_FOLDER = ".registering"
REGISTERED_SUFFIX = "_registered"


@dataclass(frozen=True)
class Multiscale:
    """One multiscale image to register: the intensities, or one label image."""

    path: str  # its folder inside the image: "" for the image, "labels/<name>"
    levels: list  # ngio images of the input's levels, finest first (read-only)
    factors: list[tuple[int, ...]] | None  # per level step; None: not integral
    pairs: list[WindowPair]
    kind: Aggregation

    def array_paths(self) -> list[str]:
        """The level arrays' folders inside the image."""
        return [f"{self.path}/{level.path}".lstrip("/") for level in self.levels]


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
    multiscales: list[Multiscale]  # the image first, then its registered labels
    left_out: frozenset[str]  # folders of the input that the output drops
    tables: dict[str, str]  # table name -> URL of the image it is copied from
    overwrite_input: bool

    @property
    def labels(self) -> list[str]:
        """Names of the label images registered."""
        return [m.path.split("/", 1)[1] for m in self.multiscales[1:]]

    @property
    def scratch(self) -> Path:
        """Where the new image is built before it is put in place."""
        return self.destination.parent / SCRATCH_FOLDER / self.destination.name

    @property
    def output_url(self) -> str:
        """URL of the registered image once in place."""
        return str(self.destination)


def _pairs(
    source_rois: dict,
    target_rois: dict,
    geometry: ImageGeometry,
    what: str,
    motions: dict[str, RigidTransform] | None,
) -> list[WindowPair]:
    """Window pairs (acquisition -> reference) of every ROI, in one array's pixels.

    A ROI whose stored transform rotates is resampled through it (in this
    array's pixels); every other ROI is copied, window to window.
    """
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
        motion = (motions or {}).get(name)
        if motion is None or motion.is_translation:
            pairs.append(WindowPair(source, target))
            continue
        in_pixels = motion_in_pixels(
            motion, geometry.pixel_um, f"ROI {name!r} of {what}"
        )
        pairs.append(WindowPair(source, target, in_pixels))
    return pairs


def _read_tables(plan_acq, plan_ref, acq_url, ref_url) -> dict[str, str]:
    """Which image each table is copied from, every table checked readable.

    The reference's ROI tables come from the reference (the image is now in its
    frame); every other table, including a ROI table the reference lacks, is
    the acquisition's, carried over as it is.
    """
    tables: dict[str, str] = {}
    from_reference = _roi_tables(plan_ref, ref_url)
    # the reference's transforms (identity) go with its ROI tables: the
    # registered image is in the reference's frame
    listed = plan_ref.list_tables()
    from_reference += [
        transform_table_name(n)
        for n in from_reference
        if transform_table_name(n) in listed
    ]
    sources = [(name, plan_ref, ref_url) for name in from_reference]
    skip = {name for name, _, _ in sources}
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
        acquisition = open_image(zarr_url, read_only=True)
        reference = open_image(reference_url, read_only=True)
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
        ref_geometry = spatial_geometry(reference.get_image())
        tables = _read_tables(acquisition, reference, zarr_url, reference_url)
    motions = load_transforms(acquisition, registered_roi_table)
    image_levels = [acquisition.get_image(path=p) for p in acquisition.level_paths]
    geometry = spatial_geometry(image_levels[0])
    if not geometry.same_grid(ref_geometry):
        raise RegistrationInputError(
            f"{zarr_url!r} (pixel µm, shape {geometry}) and its reference "
            f"{reference_url!r} ({ref_geometry}) differ in pixel size or shape. "
            "Registration only shifts images of the same grid; resample or crop "
            "the acquisitions to the reference first."
        )
    multiscales = [
        _multiscale(
            "",
            image_levels,
            _pairs(acq_rois, ref_rois, geometry, f"image {zarr_url!r}", motions),
            "mean",
            f"image {zarr_url!r}",
        )
    ]
    labels = label_names(zarr_url)
    left_out: set[str] = set()
    if register_labels:
        for name in labels:
            what = f"label {name!r} of {zarr_url!r}"
            levels = open_label_levels(zarr_url, name)
            label_geometry = spatial_geometry(levels[0])
            _require_same_extent(label_geometry, geometry, name, zarr_url)
            pairs = _pairs(acq_rois, ref_rois, label_geometry, what, motions)
            multiscales.append(
                _multiscale(f"labels/{name}", levels, pairs, "nearest", what)
            )
    elif labels:
        if overwrite_input:
            raise RegistrationInputError(
                f"register_labels=False would drop the label image(s) {labels} of "
                f"{zarr_url!r}: the registered image replaces the input "
                "(overwrite_input=True), and labels that are not registered no "
                "longer match it. Set register_labels=True, or overwrite_input="
                "False to write the registered image next to the input, which "
                "keeps its labels."
            )
        left_out.add("labels")
    if not overwrite_input and destination.exists():
        _require_ours(destination)
    left_out.update(f"tables/{name}" for name, url in tables.items() if url != zarr_url)
    return ApplyPlan(
        zarr_url=zarr_url,
        reference_url=reference_url,
        well_url=well_url,
        image_path=image_path,
        destination=destination,
        registered_roi_table=registered_roi_table,
        acquisition=acquisition,
        reference=reference,
        multiscales=multiscales,
        left_out=frozenset(left_out),
        tables=tables,
        overwrite_input=overwrite_input,
    )


def _multiscale(
    path: str, levels: list, pairs: list[WindowPair], kind: Aggregation, what: str
) -> Multiscale:
    """A multiscale image to register, its levels checked for an empty start.

    Raises:
        RegistrationInputError: If a level's fill value is not zero: its
            unwritten chunks, which the writer leaves for all-zero parts,
            would then not read as zero.
    """
    for level in levels:
        fill = level.zarr_array.fill_value
        if fill is None or fill != 0:
            raise RegistrationInputError(
                f"Level {level.path!r} of {what} has fill value {fill!r}; "
                "registration writes only the chunks that hold data and needs "
                "unwritten chunks to read as 0. Re-write the array with "
                "fill_value=0."
            )
    return Multiscale(path, levels, _level_factors(levels), pairs, kind)


def _require_same_extent(
    label: ImageGeometry, image: ImageGeometry, name: str, url: str
) -> None:
    """A label must cover the same physical extent as its image."""
    label_um = {a: n * label.pixel_um[a] for a, n in label.shape.items()}
    image_um = {a: n * image.pixel_um[a] for a, n in image.shape.items()}
    if set(label_um) != set(image_um) or any(
        not at_most(abs(label_um[a] - image_um[a]), label.pixel_um[a]) for a in label_um
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


def _level_factors(levels: list) -> list[tuple[int, ...]] | None:
    """The integer factor per axis between consecutive levels, None if not integral.

    Taken from the levels' own pixel sizes, so that a label's pyramid follows
    the label, not the image.
    """
    factors = []
    for above, below in zip(levels, levels[1:]):
        step = []
        for axis, n_above, n_below in zip(above.axes, above.shape, below.shape):
            if axis not in SPATIAL_AXES:
                step.append(1)
                continue
            ratio = getattr(below.pixel_size, axis) / getattr(above.pixel_size, axis)
            if (
                not same_value(ratio, round(ratio))
                or -(-n_above // round(ratio)) < n_below
            ):
                return None
            step.append(round(ratio))
        factors.append(tuple(step))
    return factors


def _write(multiscale: Multiscale, scratch: Path, workers: int) -> None:
    """Write windows and pyramid of one image or label into the scratch copy."""
    targets = [
        zarr.open_array(str(scratch / path), mode="r+")
        for path in multiscale.array_paths()
    ]
    source = multiscale.levels[0]
    # Without whole factors between levels, only level 0 is written here
    # (write_windows takes as many levels as it is given factors for).
    write_windows(
        source.zarr_array,
        targets,
        source.axes,
        multiscale.pairs,
        multiscale.factors or [],
        kind=multiscale.kind,
        workers=workers,
    )
    if multiscale.factors is not None:
        return
    # Pyramid steps that are not whole factors: let ngio interpolate them.
    if multiscale.kind == "mean":
        new = ngio.open_image(str(scratch), path=source.path)
        new.consolidate(order="linear", mode="auto")
    else:
        ngio.open_label(str(scratch / multiscale.path), path=source.path).consolidate(
            mode="auto"
        )


def _copy_tables(plan: ApplyPlan, scratch: Path) -> None:
    """Copy the reference's tables' folders byte for byte, and list every table.

    A folder copy keeps every column, dtype and backend exactly, and costs far
    less than decoding and re-encoding each table. The acquisition's own
    tables came with the rest of its folder.
    """
    from_reference = [n for n, url in plan.tables.items() if url != plan.zarr_url]
    if not from_reference:
        return
    folder = scratch / "tables"
    version = zarr.open_group(str(scratch), mode="r").metadata.zarr_format
    group = zarr.open_group(str(folder), mode="a", zarr_format=version)
    with reading(Path(plan.reference_url)):
        for name in from_reference:
            shutil.copytree(Path(plan.reference_url, "tables", name), folder / name)
    found = group.attrs.get("tables", [])
    listed = [str(n) for n in found] if isinstance(found, list) else []
    missing = [name for name in plan.tables if name not in listed]
    if missing:
        group.attrs["tables"] = listed + missing


def write_registered(plan: ApplyPlan, workers: int) -> None:
    """Build the registered image in the plan's scratch directory.

    On any error the scratch directory is removed before the error passes on.
    """
    scratch = plan.scratch
    shutil.rmtree(scratch, ignore_errors=True)  # leftover of a killed run
    emptied = [path for m in plan.multiscales for path in m.array_paths()]
    _make_scratch(scratch)
    try:
        copy_skeleton(Path(plan.zarr_url), scratch, emptied, plan.left_out)
        # Tables are small files: copy them while the pixels are written.
        with ThreadPoolExecutor(1) as background:
            tables = background.submit(_copy_tables, plan, scratch)
            _write_pixels(plan, scratch, workers)
            tables.result()
        logger.info("Copied %d table(s): %s.", len(plan.tables), sorted(plan.tables))
        zarr.open_group(str(scratch), mode="r+").attrs[PROVENANCE_KEY] = {
            "source": plan.image_path,
            "reference": plan.reference_url.rsplit("/", 1)[-1],
            "registered_roi_table": plan.registered_roi_table,
            "version": fractal_tasks.__version__,
        }
        refresh_consolidated_metadata(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_if_empty(scratch.parent)
        raise


def _make_scratch(scratch: Path) -> None:
    """Create the empty scratch directory, and its shared parent if needed.

    Another run removes the parent once it is empty; a parent removed between
    our two ``mkdir`` calls is simply made again.
    """
    while True:
        scratch.parent.mkdir(exist_ok=True)
        try:
            scratch.mkdir()
            return
        except FileNotFoundError:
            continue


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` unless it holds something (another run's scratch)."""
    try:
        folder.rmdir()
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def _write_pixels(plan: ApplyPlan, scratch: Path, workers: int) -> None:
    """Write the registered image and labels into the scratch copy."""
    for multiscale in plan.multiscales:
        started = time.perf_counter()
        _write(multiscale, scratch, workers)
        logger.info(
            "Wrote %d window(s) of %s and its %d-level pyramid in %.2f s.",
            len(multiscale.pairs),
            f"{plan.zarr_url}/{multiscale.path}".rstrip("/"),
            len(multiscale.levels),
            time.perf_counter() - started,
        )


def commit(plan: ApplyPlan) -> dict:
    """Put the registered image in place and report it to Fractal.

    Consolidated metadata of the well, its row and the plate (where a writer
    kept it) is refreshed afterwards, so that readers trusting it see the new
    image.
    """
    well_folder = Path(plan.well_url)
    plate_folder = well_folder.parent.parent
    # one commit at a time per plate, so that no refresh misses another's image
    with updating(plate_folder):
        replace_directory(plan.scratch, plan.destination)
        _remove_if_empty(plan.scratch.parent)
        logger.info("Registered image in place at %s.", plan.destination)
        if plan.overwrite_input:
            updates = {"image_list_updates": [{"zarr_url": plan.zarr_url}]}
        else:
            new_path = plan.destination.name
            well = open_well(plan.well_url)
            acquisition = acquisition_of(well, plan.well_url, plan.image_path)
            if add_image_to_well(plan.well_url, new_path, acquisition):
                logger.info(
                    "Added %s to the metadata of well %s.", new_path, plan.well_url
                )
            updates = {
                "image_list_updates": [
                    {"zarr_url": plan.output_url, "origin": plan.zarr_url}
                ]
            }
        for group in (well_folder, well_folder.parent, well_folder.parent.parent):
            if refresh_consolidated_metadata(group):
                logger.info("Refreshed the consolidated metadata of %s.", group)
    return updates
