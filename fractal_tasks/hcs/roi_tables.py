"""ROI tables: reading them safely, translations on their rows, image geometry.

The column names are those of fractal-tasks-core, so tables move between the
two packages: ``translation_z``, ``translation_y``, ``translation_x`` in
micrometres, the shift that moves the acquisition onto the reference.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import zarr
from ngio import OmeZarrContainer, Roi
from ngio.tables import ConditionTable, RoiTable, Table, write_table

from fractal_tasks.geometry import SPATIAL_AXES, ImageGeometry, RigidTransform
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.swap import replace_directory

TRANSLATION_COLUMNS = {axis: f"translation_{axis}" for axis in SPATIAL_AXES}

ROTATION_COLUMN = "rotation_deg"
"""The quality table's column with each ROI's rotation (degrees, about the
ROI's centre), the part of the transform a ROI table cannot hold: ngio warns
about columns outside the ROI-table specification."""

TRANSFORM_COLUMNS = (
    ROTATION_COLUMN,
    "center_y_micrometer",
    "center_x_micrometer",
    *TRANSLATION_COLUMNS.values(),
)
"""The transform table's columns: one rigid transform per ROI name, in µm."""

ZARR_V3_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part"
"""The start of zarr's warning on every zarr v3 group whose metadata is
consolidated (anndata does it for each table, a writer may for a plate)."""


def load_rois(container: OmeZarrContainer, table: str, zarr_url: str) -> list[Roi]:
    """All ROIs of a ROI (or masking ROI) table, validated.

    Raises:
        RegistrationInputError: If the table is missing, is not a ROI table,
            cannot be read, or has unnamed or duplicate ROI names.
    """
    available = container.list_tables()
    if table not in available:
        raise RegistrationInputError(
            f"ROI table {table!r} not found in {zarr_url!r} (tables: {available}). "
            "Choose an existing table, or run the task that writes it first."
        )
    try:
        roi_table = container.get_generic_roi_table(table)
        rois = roi_table.rois()
        # ngio keys ROIs by name and silently keeps one of a duplicated name;
        # the table's own index still shows every row.
        index = roi_table.dataframe.index
    except Exception as error:
        raise RegistrationInputError(
            f"Cannot read ROI table {table!r} of {zarr_url!r}: {error}. It must be "
            "a ROI table in a backend ngio can read (anndata, parquet, csv, json)."
        ) from error
    if any(not roi.name for roi in rois):
        raise RegistrationInputError(
            f"ROI table {table!r} of {zarr_url!r} has ROIs without a name; ROIs "
            "are paired across acquisitions by name."
        )
    names = [str(name) for name in index]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistrationInputError(
            f"ROI table {table!r} of {zarr_url!r} has duplicate ROI names "
            f"{duplicates}; ROIs are paired across acquisitions by name, so each "
            "name must be unique."
        )
    return rois


def by_name(rois: list[Roi]) -> dict[str, Roi]:
    """ROIs keyed by name (names validated by ``load_rois``)."""
    return {str(roi.name): roi for roi in rois}


def require_same_names(
    names: Mapping[str, set[str]], table: str, reference_url: str
) -> None:
    """Check every image's table holds the same ROI names as the reference's.

    Raises:
        RegistrationInputError: Naming the image and the names that differ.
    """
    expected = names[reference_url]
    for url, found in names.items():
        if found != expected:
            raise RegistrationInputError(
                f"ROI table {table!r} of {url!r} does not hold the same ROI names "
                f"as the reference {reference_url!r}: missing "
                f"{sorted(expected - found)}, extra {sorted(found - expected)}. ROIs "
                "are paired by name; make the tables match (same FOV names)."
            )


def load_paired_rois(
    reference: OmeZarrContainer,
    acquisition: OmeZarrContainer,
    table: str,
    reference_url: str,
    zarr_url: str,
) -> tuple[dict[str, Roi], dict[str, Roi]]:
    """ROIs of one table in the reference and an acquisition, keyed by name.

    Raises:
        RegistrationInputError: As ``load_rois``, or if the two tables do not
            hold the same ROI names.
    """
    reference_rois = by_name(load_rois(reference, table, reference_url))
    acquisition_rois = load_rois_like(
        reference_rois, acquisition, table, reference_url, zarr_url
    )
    return reference_rois, acquisition_rois


def load_rois_like(
    reference_rois: Mapping[str, Roi],
    acquisition: OmeZarrContainer,
    table: str,
    reference_url: str,
    zarr_url: str,
) -> dict[str, Roi]:
    """An acquisition's ROIs of one table by name, the same names as the reference's.

    Raises:
        RegistrationInputError: As ``load_rois``, or if the two tables do not
            hold the same ROI names.
    """
    acquisition_rois = by_name(load_rois(acquisition, table, zarr_url))
    require_same_names(
        {reference_url: set(reference_rois), zarr_url: set(acquisition_rois)},
        table,
        reference_url,
    )
    return acquisition_rois


def slices_um(roi: Roi) -> dict[str, tuple[float, float]]:
    """``axis -> (start, length)`` in micrometres of a ROI's spatial slices."""
    out = {}
    for axis in SPATIAL_AXES:
        try:
            piece = roi[axis]
        except (KeyError, ValueError):
            continue
        if piece is None or piece.start is None or piece.length is None:
            continue
        out[axis] = (float(piece.start), float(piece.length))
    return out


def translation_um(roi: Roi) -> dict[str, float] | None:
    """The stored translation of a ROI, or None when it has none.

    Raises:
        RegistrationInputError: If only some columns are present, or a value is
            NaN (the table was written by an interrupted or failed run).
    """
    extra = roi.model_extra or {}
    present = {a: extra.get(c) for a, c in TRANSLATION_COLUMNS.items() if c in extra}
    if not present or all(_missing(v) for v in present.values()):
        return None
    bad = [TRANSLATION_COLUMNS[a] for a in SPATIAL_AXES if _missing(present.get(a))]
    if bad:
        raise RegistrationInputError(
            f"ROI {roi.name!r} has missing or NaN {bad}. Re-run 'Calculate "
            "Registration (image-based)' on this acquisition."
        )
    return {a: float(v) for a, v in present.items() if v is not None}


def stored_translations(
    rois: Mapping[str, Roi], zarr_url: str, table: str
) -> dict[str, dict[str, float]] | None:
    """The stored translation (µm per axis) of every ROI of one image.

    The one check of stored translations, for consensus and the QC picture.

    Returns:
        ``ROI name -> translation``, or None when no ROI has one (calculate
        has not run on this image with this table).

    Raises:
        RegistrationInputError: If some ROIs have a translation and others not,
            or one is incomplete (an interrupted or failed run).
    """
    found = {name: translation_um(roi) for name, roi in rois.items()}
    missing = sorted(name for name, value in found.items() if value is None)
    if len(missing) == len(found):
        return None
    if missing:
        raise RegistrationInputError(
            f"ROI table {table!r} of {zarr_url!r} has no translation for {missing} "
            "but has one for other ROIs. Re-run 'Calculate Registration "
            "(image-based)' on this acquisition."
        )
    return {name: value for name, value in found.items() if value is not None}


def quality_table_name(input_roi_table: str) -> str:
    """Name of the table holding the per-ROI verdicts of ``input_roi_table``."""
    return f"{input_roi_table}_registration_quality"


def transform_table_name(registered_roi_table: str) -> str:
    """Name of the table holding the transform of each registered ROI."""
    return f"{registered_roi_table}_transform"


def roi_centre_um(roi: Roi) -> dict[str, float]:
    """The (y, x) centre of a ROI in µm."""
    return {a: b + n / 2 for a, (b, n) in slices_um(roi).items() if a in ("y", "x")}


def stored_transforms(
    container: OmeZarrContainer, rois: Mapping[str, Roi], zarr_url: str, table: str
) -> dict[str, RigidTransform] | None:
    """The transform Calculate stored for every ROI of one image (µm).

    The translation from the ROI table (:func:`stored_translations`), the
    rotation from the quality table's ``rotation_deg`` (0 where a table
    lacks it: fractal-tasks-core, or an earlier version of this package),
    about the ROI's centre.

    Returns:
        ``ROI name -> transform``, or None when no ROI has a translation.

    Raises:
        RegistrationInputError: As :func:`stored_translations`.
    """
    translations = stored_translations(rois, zarr_url, table)
    if translations is None:
        return None
    rotations: dict[str, float] = {}
    quality = quality_table_name(table)
    if quality in container.list_tables():
        frame = container.get_table(quality).dataframe
        if ROTATION_COLUMN in frame:
            for name, value in frame[ROTATION_COLUMN].items():
                if not _missing(value):
                    rotations[str(name)] = float(value)
    return {
        name: RigidTransform(rotations.get(name, 0.0), roi_centre_um(rois[name]), t)
        for name, t in translations.items()
    }


def transform_table(transforms: Mapping[str, RigidTransform]) -> ConditionTable:
    """Transforms (µm) by ROI name, as a condition table."""
    rows = {
        name: (
            t.rotation_deg,
            t.center.get("y", 0.0),
            t.center.get("x", 0.0),
            *(t.translation.get(a, 0.0) for a in TRANSLATION_COLUMNS),
        )
        for name, t in transforms.items()
    }
    frame = pd.DataFrame.from_dict(
        rows, orient="index", columns=list(TRANSFORM_COLUMNS)
    )
    frame.index.name = "roi"
    return ConditionTable(frame)


def motion_in_pixels(
    motion: RigidTransform, pixel_um: Mapping[str, float], what: str
) -> RigidTransform:
    """A stored transform (µm) in the pixels of a grid.

    Raises:
        RegistrationInputError: For a rotation on pixels that are not square
            in (y, x), naming ``what`` (the ROI and its image).
    """
    try:
        return motion.in_pixels(pixel_um)
    except ValueError as error:
        raise RegistrationInputError(
            f"{what} is rotated by {motion.rotation_deg:.3f}°, but {error}. "
            "Resample the images to square pixels, or register with "
            'transform="translation".'
        ) from error


def load_transforms(
    container: OmeZarrContainer, registered_roi_table: str
) -> dict[str, RigidTransform] | None:
    """The transforms Consensus stored beside a registered ROI table.

    Returns:
        ``ROI name -> transform`` in µm; None when there is no such table
        (written by fractal-tasks-core, or an earlier version of this
        package: the windows alone then say the translation).
    """
    name = transform_table_name(registered_roi_table)
    if name not in container.list_tables():
        return None
    frame = container.get_table(name).dataframe
    out = {}
    for roi, row in frame.iterrows():
        out[str(roi)] = RigidTransform(
            float(row[ROTATION_COLUMN]),
            {
                "y": float(row["center_y_micrometer"]),
                "x": float(row["center_x_micrometer"]),
            },
            {a: float(row[c]) for a, c in TRANSLATION_COLUMNS.items()},
        )
    return out


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def with_columns(roi: Roi, columns: Mapping[str, object]) -> Roi:
    """The ROI with extra columns set (existing extras are kept)."""
    return roi.model_copy(update=dict(columns))


def without_columns(roi: Roi, prefix: str) -> Roi:
    """The ROI without the extra columns whose names start with ``prefix``."""
    if not any(name.startswith(prefix) for name in roi.model_extra or {}):
        return roi
    data = roi.model_dump()
    return Roi.model_validate(
        {k: v for k, v in data.items() if not k.startswith(prefix)}
    )


def save_table(
    container: OmeZarrContainer,
    zarr_url: str,
    name: str,
    table: Table,
    backend: str | None,
) -> None:
    """Write ``table`` as ``name`` in ``backend``, replacing an existing one safely.

    An existing table is rewritten beside itself (``<name>.writing``) and then
    exchanged in one step, so a killed run leaves the old table or the new one,
    never half of one.
    """
    backend = backend or "anndata"
    folder = Path(zarr_url, "tables", name)
    with warnings.catch_warnings():
        # anndata announces, on every write, that zarr v2 will stop being its
        # default; an NGFF 0.4 image is zarr v2, and its tables must be too
        warnings.filterwarnings(
            "ignore",
            message="Writing zarr v2 data will no longer be the default",
            category=UserWarning,
        )
        # and zarr, on every NGFF 0.5 table that anndata consolidates
        warnings.filterwarnings(
            "ignore", ZARR_V3_CONSOLIDATED_WARNING, category=UserWarning
        )
        if name not in container.list_tables() or not folder.is_dir():
            container.add_table(name, table, backend=backend, overwrite=True)
            return
        scratch = folder.with_name(name + ".writing")
        shutil.rmtree(scratch, ignore_errors=True)
        version = zarr.open_group(str(folder), mode="r").metadata.zarr_format
        group = zarr.open_group(str(scratch), mode="w", zarr_format=version)
        write_table(group, table, backend=backend)
    replace_directory(scratch, folder)


def save_rois(
    container: OmeZarrContainer,
    zarr_url: str,
    name: str,
    rois: list[Roi],
    backend: str | None,
) -> None:
    """Write ``rois`` as ROI table ``name``, see :func:`save_table`."""
    save_table(container, zarr_url, name, RoiTable(rois=rois), backend)


def table_backend(container: OmeZarrContainer, table: str) -> str | None:
    """Backend name of an existing table (None when ngio does not know it)."""
    return container.get_table(table).backend_name


def spatial_geometry(image) -> ImageGeometry:
    """Pixel size (µm) and size (px) per spatial axis of an ngio image."""
    sizes = {"z": image.pixel_size.z, "y": image.pixel_size.y, "x": image.pixel_size.x}
    shape = dict(zip(image.axes, image.shape))
    axes = [a for a in SPATIAL_AXES if a in shape]
    return ImageGeometry(
        {a: float(sizes[a]) for a in axes}, {a: int(shape[a]) for a in axes}
    )
