"""Small HCS plates written by other writers (ome-zarr-py, bioio-ome-zarr).

Every acquisition of the one well (``A/1``) is cut out of the same noise-free
canvas of blobs, each FOV at its own whole-pixel offset, so the true
translation is known exactly and, once registered, every acquisition must equal
the registered reference pixel for pixel. Convention of the ROI tables: if
acquisition pixel ``q`` shows reference pixel ``q + t``, the translation is
``t``.

After the writer ran, the builder adds what every variant carries and what no
writer knows: an attribute ``my_lab`` on each image group and an unknown
subgroup ``extra/`` with an array. Then the ROI tables our tasks read
(``FOV_ROI_table``, ``well_ROI_table``, µm, as Fractal converters write them)
are written by opening with ngio only each image's ``tables`` group, so that
the writer's own metadata stays byte-identical (checked here: ngio opening the
image in r+ mode would rewrite an ome-zarr-py NGFF 0.5 ``labels/zarr.json``).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from ngio import Roi, RoiTable
from ngio.tables import open_tables_container
from scipy import ndimage

ROW, COLUMN = "A", "1"
FOVS = (2, 2)
FOV_SHAPE = (128, 160)  # level-0 px (y, x)
PIXEL_UM = 0.65
MAX_SHIFT = 6  # px, in y and x; the canvas margin is larger
MARGIN = 8
CHANNELS = (("DAPI", "A01_C01", "0000FF"), ("GFP", "A01_C02", "00FF00"))
METADATA_NAMES = (".zattrs", ".zarray", ".zgroup", ".zmetadata", "zarr.json")
MY_LAB = {"my_lab": {"instrument": "scope-7", "operator": "ab", "plate_id": 42}}


@dataclass(frozen=True)
class Variant:
    """One way another writer lays out a plate."""

    name: str
    writer: str  # "ome-zarr-py" or "bioio"
    ngff: str  # "0.4" (zarr v2) or "0.5" (zarr v3)
    axes: str = "cyx"
    n_acquisitions: int = 2
    image_levels: int = 3
    chunks: tuple[int, ...] | None = None  # None: the writer's default
    shards: tuple[int, ...] | None = None
    # label name -> levels (ome-zarr-py only; None: write_labels' own default)
    labels: dict[str, int | None] = field(default_factory=dict)
    consolidated: bool = False  # zarr.consolidate_metadata at the plate root

    @property
    def zarr_format(self) -> int:
        return 2 if self.ngff == "0.4" else 3


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "omezarr04",
            "ome-zarr-py",
            "0.4",
            axes="czyx",
            n_acquisitions=2,
            chunks=(1, 1, 128, 160),
            # write_labels' default pyramid: 5 levels, more than the image's 3
            labels={"nuclei": None},
            consolidated=True,
        ),
        Variant(
            "omezarr04_short_label",
            "ome-zarr-py",
            "0.4",
            chunks=(1, 128, 160),
            labels={"cells": 2},  # fewer levels than the image's 3
        ),
        Variant(
            "omezarr05",
            "ome-zarr-py",
            "0.5",
            chunks=(1, 128, 160),
            labels={"nuclei": None, "cells": 2},
        ),
        Variant(
            "omezarr05_sharded",
            "ome-zarr-py",
            "0.5",
            axes="czyx",
            chunks=(1, 1, 64, 80),
            shards=(1, 1, 128, 160),
            labels={"nuclei": None},
        ),
        Variant("bioio_v2", "bioio", "0.4", axes="czyx"),
        Variant(
            "bioio_v3",
            "bioio",
            "0.5",
            chunks=(1, 64, 80),
            shards=(1, 128, 160),
        ),
    )
}


@dataclass
class ForeignImage:
    """One image of the plate, as ``_workflow`` expects it."""

    zarr_url: str
    path: str
    acquisition: int


@dataclass
class ForeignPlate:
    """What was written, and the truth to check a registration against."""

    plate_url: str
    variant: Variant
    images: list[ForeignImage]
    level_paths: list[str]
    label_levels: dict[str, int]  # label name -> levels written
    # image path -> FOV name -> (y, x) translation in level-0 px
    shifts_px: dict[str, dict[str, tuple[int, int]]]
    # path relative to the plate -> bytes of every metadata file, at the end
    metadata: dict[str, bytes]

    @property
    def well_url(self) -> str:
        return f"{self.plate_url}/{ROW}/{COLUMN}"

    def copy_to(self, target: Path) -> ForeignPlate:
        """The same plate copied to ``target`` (a ``.zarr`` path)."""
        shutil.copytree(self.plate_url, target)
        images = [
            ForeignImage(
                i.zarr_url.replace(self.plate_url, str(target)), i.path, i.acquisition
            )
            for i in self.images
        ]
        return ForeignPlate(
            str(target),
            self.variant,
            images,
            list(self.level_paths),
            dict(self.label_levels),
            self.shifts_px,
            dict(self.metadata),
        )


def fov_names() -> list[str]:
    return [f"FOV_{i + 1}" for i in range(FOVS[0] * FOVS[1])]


def fov_origin(index: int) -> tuple[int, int]:
    iy, ix = divmod(index, FOVS[1])
    return iy * FOV_SHAPE[0], ix * FOV_SHAPE[1]


def well_shape() -> tuple[int, int]:
    return FOVS[0] * FOV_SHAPE[0], FOVS[1] * FOV_SHAPE[1]


def metadata_files(root: str | Path) -> dict[str, bytes]:
    """Bytes of every zarr metadata file under ``root``, by relative path."""
    root = Path(root)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.name in METADATA_NAMES and p.is_file()
    }


def chunk_files(root: str | Path) -> dict[str, bytes]:
    """Bytes of every other file under ``root`` (chunks, shards, tables)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in METADATA_NAMES
    }


# --------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------


def _canvas(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint16 (c, y, x) blobs on a textured background, and uint32 labels.

    The canvas is the well plus a margin wider than any shift, so every FOV of
    every acquisition cuts real content.
    """
    wy, wx = well_shape()
    shape = (wy + 2 * MARGIN, wx + 2 * MARGIN)
    channels = []
    for c in range(len(CHANNELS)):
        seeds = (rng.random(shape) < 0.004) * rng.uniform(0.5, 1.5, shape)
        blobs = ndimage.gaussian_filter(seeds, 2.5 + c) * 2 * np.pi * (2.5 + c) ** 2
        texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
        image = 100 + 1500 * blobs + 40 * texture
        channels.append(np.clip(image, 0, 65535).astype(np.uint16))
        if c == 0:
            labels, _ = ndimage.label(blobs > 0.35)
    return np.stack(channels), labels.astype(np.uint32)


def _shifts(rng: np.random.Generator, n_acquisitions: int) -> list[dict]:
    """Per acquisition, FOV name -> integer (y, x) translation; 0 is the reference."""
    out = [dict.fromkeys(fov_names(), (0, 0))]
    for _ in range(1, n_acquisitions):
        base = rng.integers(-MAX_SHIFT + 2, MAX_SHIFT - 1, 2)
        out.append(
            {
                name: tuple(int(v) for v in base + rng.integers(-2, 3, 2))
                for name in fov_names()
            }
        )
    return out


def _cut(canvas: np.ndarray, shifts: dict) -> np.ndarray:
    """One acquisition: every FOV cut from the canvas at its own offset."""
    wy, wx = well_shape()
    fy, fx = FOV_SHAPE
    out = np.zeros((*canvas.shape[:-2], wy, wx), canvas.dtype)
    for i, name in enumerate(fov_names()):
        oy, ox = fov_origin(i)
        ty, tx = shifts[name]
        y0, x0 = MARGIN + oy + ty, MARGIN + ox + tx
        out[..., oy : oy + fy, ox : ox + fx] = canvas[..., y0 : y0 + fy, x0 : x0 + fx]
    return out


def _on_axes(data: np.ndarray, axes: str) -> np.ndarray:
    """(c, y, x) or (y, x) data with a size-1 z axis where ``axes`` has one."""
    if "z" in axes:
        return data[:, None] if data.ndim == 3 else data[None]
    return data


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _omero(ngff: str) -> dict:
    """Full omero block: id, name, version, rdefs, channel windows."""
    return {
        "id": 1,
        "name": "foreign",
        "version": ngff,
        "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"},
        "channels": [
            {
                "label": label,
                "wavelength_id": wavelength,
                "color": color,
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {"min": 0, "max": 65535, "start": 100, "end": 2000},
            }
            for label, wavelength, color in CHANNELS
        ],
    }


def _write_omezarr_py(variant: Variant, plate: str, images: list, labels: list):
    """Plate, well and images with ome-zarr-py's writer functions."""
    from ome_zarr.format import FormatV04, FormatV05

    with warnings.catch_warnings():
        # write_labels' default argument Scaler(order=0) is deprecated (0.18)
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import (
            write_image,
            write_labels,
            write_plate_metadata,
            write_well_metadata,
        )

    fmt = FormatV04() if variant.ngff == "0.4" else FormatV05()
    root = zarr.open_group(plate, mode="w", zarr_format=variant.zarr_format)
    acquisitions = [{"id": a} for a in range(len(images))]
    write_plate_metadata(
        root,
        [ROW],
        [COLUMN],
        [f"{ROW}/{COLUMN}"],
        fmt=fmt,
        acquisitions=acquisitions,
        name="foreign",
    )
    well = root.require_group(f"{ROW}/{COLUMN}")
    write_well_metadata(
        well,
        [{"path": str(a), "acquisition": a} for a in range(len(images))],
        fmt=fmt,
    )
    scale = {"c": 1.0, "z": 1.0, "y": PIXEL_UM, "x": PIXEL_UM}
    units = {"z": "micrometer", "y": "micrometer", "x": "micrometer"}
    options: dict = {}
    if variant.chunks:
        options["chunks"] = variant.chunks
    if variant.shards:
        options["shards"] = variant.shards
    factors = tuple(2**k for k in range(1, variant.image_levels))
    for a, (data, label) in enumerate(zip(images, labels)):
        group = well.require_group(str(a))
        write_image(
            _on_axes(data, variant.axes),
            group,
            scale_factors=factors,
            fmt=fmt,
            axes=variant.axes,
            scale={k: scale[k] for k in variant.axes},
            axes_units={k: units[k] for k in variant.axes if k in units},
            storage_options=options or None,
            omero=_omero(variant.ngff),
        )
        label_axes = variant.axes.replace("c", "")
        for name, levels in variant.labels.items():
            kwargs: dict = {}
            if levels is not None:
                kwargs = {
                    "scaler": None,
                    "scale_factors": tuple(2**k for k in range(1, levels)),
                }
            with warnings.catch_warnings():
                # the default scaler=Scaler(order=0) is deprecated in 0.18
                warnings.simplefilter("ignore", DeprecationWarning)
                write_labels(
                    _on_axes(label, variant.axes),
                    group,
                    name=name,
                    fmt=fmt,
                    axes=label_axes,
                    scale={k: scale[k] for k in label_axes},
                    label_metadata={
                        "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
                    },
                    **kwargs,
                )


def _write_bioio(variant: Variant, plate: str, images: list):
    """Images with bioio-ome-zarr's OMEZarrWriter; plate and well attributes
    with zarr (the writer writes single images only)."""
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    ngff = variant.ngff
    n = len(images)
    wells = [{"path": f"{ROW}/{COLUMN}", "rowIndex": 0, "columnIndex": 0}]
    plate_attrs = {
        "name": "foreign",
        "rows": [{"name": ROW}],
        "columns": [{"name": COLUMN}],
        "wells": wells,
        "acquisitions": [{"id": a} for a in range(n)],
        "version": ngff,
    }
    well_attrs = {"images": [{"path": str(a), "acquisition": a} for a in range(n)]}
    root = zarr.open_group(plate, mode="w", zarr_format=variant.zarr_format)
    well = root.require_group(f"{ROW}/{COLUMN}")
    if ngff == "0.4":
        root.attrs["plate"] = plate_attrs
        well.attrs["well"] = {**well_attrs, "version": ngff}
    else:
        root.attrs["ome"] = {"version": ngff, "plate": plate_attrs}
        well.attrs["ome"] = {"version": ngff, "well": well_attrs}
    channels = [
        Channel(
            label=label,
            color=color,
            window={"min": 0, "max": 65535, "start": 100, "end": 2000},
        )
        for label, _, color in CHANNELS
    ]
    sizes = {"c": 1.0, "z": 1.0, "y": PIXEL_UM, "x": PIXEL_UM}
    for a, data in enumerate(images):
        data = _on_axes(data, variant.axes)
        shapes = [
            tuple(
                -(-s // 2**k) if ax in "yx" else s
                for ax, s in zip(variant.axes, data.shape)
            )
            for k in range(variant.image_levels)
        ]
        writer = OMEZarrWriter(
            f"{plate}/{ROW}/{COLUMN}/{a}",
            level_shapes=shapes,
            dtype=data.dtype,
            chunk_shape=variant.chunks,
            shard_shape=variant.shards,
            zarr_format=variant.zarr_format,
            image_name=f"acquisition {a}",
            channels=channels,
            rdefs={"defaultT": 0, "defaultZ": 0, "model": "color"},
            axes_names=list(variant.axes),
            axes_units=[None if ax == "c" else "micrometer" for ax in variant.axes],
            physical_pixel_size=[sizes[ax] for ax in variant.axes],
        )
        writer.write_full_volume(data)


# --------------------------------------------------------------------------
# What every variant adds
# --------------------------------------------------------------------------


def _add_extras(image_url: str, zarr_format: int) -> None:
    """An unknown attribute and an unknown subgroup with an array."""
    group = zarr.open_group(image_url, mode="r+", zarr_format=zarr_format)
    group.attrs.update(MY_LAB)
    extra = group.require_group("extra")
    extra.attrs["note"] = "not NGFF"
    extra.create_array("counts", data=np.arange(12, dtype="int32").reshape(3, 4))


def _write_roi_tables(image_url: str, variant: Variant) -> None:
    """FOV_ROI_table and well_ROI_table in µm, through the tables group only."""
    z = {"z": (0.0, 1.0)} if "z" in variant.axes else {}
    fy, fx = FOV_SHAPE
    rois = []
    for i, name in enumerate(fov_names()):
        oy, ox = fov_origin(i)
        slices = {
            **z,
            "y": (oy * PIXEL_UM, fy * PIXEL_UM),
            "x": (ox * PIXEL_UM, fx * PIXEL_UM),
        }
        rois.append(Roi.from_values(name=name, slices=slices))
    wy, wx = well_shape()
    well = Roi.from_values(
        name="well_1",
        slices={**z, "y": (0.0, wy * PIXEL_UM), "x": (0.0, wx * PIXEL_UM)},
    )
    image = zarr.open_group(image_url, mode="r+", zarr_format=variant.zarr_format)
    tables = open_tables_container(image.require_group("tables"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata on zarr v2
        tables.add("FOV_ROI_table", RoiTable(rois=rois), backend="anndata")
        tables.add("well_ROI_table", RoiTable(rois=[well]), backend="anndata")


def build_foreign_plate(path: str | Path, variant: Variant, seed: int = 0):
    """Write the plate of ``variant`` at ``path`` (which must not exist)."""
    plate = str(path)
    rng = np.random.default_rng(seed)
    canvas, canvas_labels = _canvas(rng)
    shifts = _shifts(rng, variant.n_acquisitions)
    images = [_cut(canvas, s) for s in shifts]
    labels = [_cut(canvas_labels, s) for s in shifts]
    if variant.writer == "ome-zarr-py":
        _write_omezarr_py(variant, plate, images, labels)
        level_paths = [f"s{k}" for k in range(variant.image_levels)]
    else:
        _write_bioio(variant, plate, images)
        level_paths = [str(k) for k in range(variant.image_levels)]
    urls = [f"{plate}/{ROW}/{COLUMN}/{a}" for a in range(variant.n_acquisitions)]
    for url in urls:
        _add_extras(url, variant.zarr_format)
    if variant.consolidated:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zarr v3 says: not spec
            zarr.consolidate_metadata(plate, zarr_format=variant.zarr_format)
    written = metadata_files(plate)
    for url in urls:
        _write_roi_tables(url, variant)
    after = metadata_files(plate)
    changed = [k for k in written if after[k] != written[k]]
    if changed:
        raise AssertionError(f"Writing the ROI tables changed {changed}")
    label_levels = {}
    for name, levels in variant.labels.items():
        label_levels[name] = levels if levels is not None else 5  # (2, 4, 8, 16)
    return ForeignPlate(
        plate_url=plate,
        variant=variant,
        images=[ForeignImage(u, str(a), a) for a, u in enumerate(urls)],
        level_paths=level_paths,
        label_levels=label_levels,
        shifts_px={str(a): s for a, s in enumerate(shifts)},
        metadata=after,
    )
