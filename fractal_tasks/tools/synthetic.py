"""Synthetic multiplexed HCS plates with known shifts (demo, tests, benchmarks).

Every well shows one scene of nuclei-like blobs. Each acquisition (imaging cycle)
sees that scene through a stage offset that differs per field of view (FOV), with
its own intensity gain, noise and an extra stain of its own. The true translation
of every FOV is known, so recovered shifts and registered pixels can be checked.

Convention (the one the ROI tables use): the translation of an acquisition's FOV
is the shift that moves the acquisition onto the reference. If acquisition pixel
``q`` shows what reference pixel ``q + t`` shows, the translation is ``t``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from ngio import (
    Channel,
    ImageInWellPath,
    Roi,
    RoiTable,
    create_empty_plate,
    create_ome_zarr_from_array,
)
from scipy import ndimage
from skimage.measure import label as connected_components

REGISTRATION_WAVELENGTH = "A01_C01"
STAIN_WAVELENGTH = "A01_C02"
SUPPORTED_AXES = ("czyx", "zyx", "cyx", "yx", "tczyx", "tyx")


@dataclass(frozen=True)
class SyntheticImage:
    """One image of the synthetic plate (one acquisition of one well)."""

    zarr_url: str
    row: str
    column: str
    path: str
    acquisition: int

    @property
    def well(self) -> str:
        """Well name as Fractal writes it in image attributes, e.g. ``B03``."""
        return f"{self.row}{self.column}"


@dataclass
class SyntheticPlate:
    """What was written, and the truth needed to check a registration."""

    plate_url: str
    images: list[SyntheticImage]
    pixel_size: float
    z_spacing: float
    fov_names: list[str]
    # zarr_url -> roi name -> (z, y, x) translation in level-0 pixels
    translations_px: dict[str, dict[str, tuple[float, float, float]]] = field(
        default_factory=dict
    )

    def true_translation_px(self, zarr_url: str, roi_name: str) -> tuple[float, ...]:
        """True (z, y, x) translation of one FOV, in level-0 pixels."""
        return self.translations_px[zarr_url][roi_name]

    def true_translation_um(self, zarr_url: str, roi_name: str) -> tuple[float, ...]:
        """True (z, y, x) translation of one FOV, in micrometres."""
        z, y, x = self.translations_px[zarr_url][roi_name]
        return (z * self.z_spacing, y * self.pixel_size, x * self.pixel_size)

    def images_of_well(self, well: str) -> list[SyntheticImage]:
        """Images of one well (e.g. ``B03``), reference acquisition first."""
        return sorted(
            (i for i in self.images if i.well == well), key=lambda i: i.acquisition
        )

    def to_json(self) -> dict:
        """Plain-JSON description of the plate and its truth."""
        return json.loads(json.dumps(asdict(self)))


def _blob_scene(
    rng: np.random.Generator, shape: tuple[int, ...], density: float, radius: float
) -> np.ndarray:
    """Blurred random blobs of varying size and brightness, float32 in about [0, 1]."""
    scene = np.zeros(shape, np.float32)
    n_spots = max(1, int(np.prod(shape[-2:]) * density))
    for scale in (0.7, 1.0, 1.5):
        spots = np.zeros(shape, np.float32)
        index = tuple(rng.integers(0, s, n_spots // 3 + 1) for s in shape)
        spots[index] = rng.uniform(0.5, 1.5, n_spots // 3 + 1)
        sigma = [radius * scale] * len(shape)
        if len(shape) == 3:
            sigma[0] = max(0.8, radius * scale / 3)
        blurred = ndimage.gaussian_filter(spots, sigma)
        scene += blurred / max(float(blurred.max()), 1e-6)
    return scene / max(float(scene.max()), 1e-6)


def _view(scene: np.ndarray, start: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sample ``scene`` on a grid of ``shape`` starting at float ``start``."""
    origin = np.floor(start).astype(int)
    fraction = start - origin
    if not fraction.any():
        return scene[tuple(slice(o, o + s) for o, s in zip(origin, shape))].copy()
    padded = scene[tuple(slice(o, o + s + 2) for o, s in zip(origin, shape))]
    moved = ndimage.shift(padded, -fraction, order=3, mode="nearest")
    return moved[tuple(slice(0, s) for s in shape)]


def _random_offsets(
    rng: np.random.Generator,
    n: int,
    max_shift: tuple[float, float, float],
    subpixel: bool,
) -> np.ndarray:
    """Per-FOV (z, y, x) stage offsets around one common offset per acquisition."""
    common = rng.uniform(-1, 1, 3) * np.array(max_shift) * 0.7
    jitter = rng.uniform(-1, 1, (n, 3)) * np.array(max_shift) * 0.3
    offsets = np.clip(common + jitter, -np.array(max_shift), np.array(max_shift))
    if not subpixel:
        offsets = np.round(offsets)
    offsets[:, 0] = np.round(offsets[:, 0])  # z steps are whole planes
    return offsets


def build_synthetic_plate(
    path: str | Path,
    *,
    wells: tuple[str, ...] = ("B03", "B05"),
    n_acquisitions: int = 3,
    fovs: tuple[int, int] = (2, 2),
    fov_shape: tuple[int, int] = (128, 160),
    n_z: int = 1,
    axes: str = "czyx",
    max_shift_fraction: float = 0.05,
    max_shift_z: int = 0,
    subpixel: bool = False,
    levels: int = 3,
    pixel_size: float = 0.65,
    z_spacing: float = 1.0,
    ngff_version: Literal["0.4", "0.5"] = "0.4",
    labels: bool = True,
    chunks: tuple[int, ...] | None = None,
    seed: int = 0,
) -> SyntheticPlate:
    """Write a multiplexed HCS plate whose per-FOV shifts are known.

    Args:
        path: Where to write the plate (``.../name.zarr``); replaced if present.
        wells: Well names, a row letter then a column number, e.g. ``("B03",)``.
        n_acquisitions: Acquisitions (cycles) per well; acquisition 0 is the
            reference and its translations are zero.
        fovs: FOVs per well in (y, x); each becomes a row of ``FOV_ROI_table``.
        fov_shape: FOV size in level-0 pixels (y, x).
        n_z: Number of z planes (1 for a 2D plate).
        axes: On-disk axes, one of ``SUPPORTED_AXES``; axes without ``c`` hold
            only the registration channel, axes with ``t`` have one time point.
        max_shift_fraction: Largest stage offset, as a fraction of the FOV size.
        max_shift_z: Largest stage offset in z, in whole planes.
        subpixel: Allow fractional offsets (in y and x) instead of whole pixels.
        levels: Pyramid levels (each halves y and x).
        pixel_size: Level-0 pixel size in y and x, in micrometres.
        z_spacing: Distance between z planes, in micrometres.
        ngff_version: ``"0.4"`` (zarr v2) or ``"0.5"`` (zarr v3).
        labels: Also write a ``nuclei`` label image in every acquisition.
        chunks: Chunk shape of the images (ngio's default when None).
        seed: Random seed; the same seed writes the same plate.

    Returns:
        The plate's URL, its images and the true translation of every FOV.

    Raises:
        ValueError: On unsupported axes, or ``n_z > 1`` without a ``z`` axis.
    """
    if axes not in SUPPORTED_AXES:
        raise ValueError(f"axes={axes!r} is not one of {SUPPORTED_AXES}.")
    if n_z > 1 and "z" not in axes:
        raise ValueError(f"n_z={n_z} needs a 'z' axis, but axes={axes!r}.")
    rng = np.random.default_rng(seed)
    plate_url = str(path)
    image_paths = [
        ImageInWellPath(row=w[0], column=w[1:], path=str(a), acquisition_id=a)
        for w in wells
        for a in range(n_acquisitions)
    ]
    create_empty_plate(
        store=plate_url,
        name=Path(plate_url).stem,
        images=image_paths,
        ngff_version=ngff_version,
        overwrite=True,
    )
    fov_h, fov_w = fov_shape
    fy, fx = fovs
    max_shift = (
        float(max_shift_z),
        max_shift_fraction * fov_h,
        max_shift_fraction * fov_w,
    )
    margin = np.array([max_shift_z + 1, int(max_shift[1]) + 3, int(max_shift[2]) + 3])
    fov_names = [f"FOV_{i + 1}" for i in range(fy * fx)]
    fov_origins = [(iy * fov_h, ix * fov_w) for iy in range(fy) for ix in range(fx)]
    plate = SyntheticPlate(
        plate_url=plate_url,
        images=[],
        pixel_size=pixel_size,
        z_spacing=z_spacing,
        fov_names=fov_names,
    )
    channels = [
        Channel.default_init(label="DAPI", wavelength_id=REGISTRATION_WAVELENGTH),
        Channel.default_init(label="GFP", wavelength_id=STAIN_WAVELENGTH),
    ]
    if "c" not in axes:
        channels = channels[:1]
    radius = max(1.5, min(fov_shape) / 40)
    for well in wells:
        scene_shape = (
            n_z + 2 * margin[0],
            fy * fov_h + 2 * margin[1],
            fx * fov_w + 2 * margin[2],
        )
        nuclei = _blob_scene(rng, scene_shape, 0.002, radius)
        for acquisition in range(n_acquisitions):
            offsets = np.zeros((len(fov_names), 3))
            if acquisition > 0:
                offsets = _random_offsets(rng, len(fov_names), max_shift, subpixel)
            stain = _blob_scene(rng, scene_shape, 0.0008, radius * 1.5)
            gain = rng.uniform(0.5, 2.0)
            clean = np.zeros((n_z, fy * fov_h, fx * fov_w), np.float32)
            other = np.zeros_like(clean)
            for (oy, ox), offset in zip(fov_origins, offsets):
                start = margin + np.array([0, oy, ox]) + offset
                box = (slice(None), slice(oy, oy + fov_h), slice(ox, ox + fov_w))
                clean[box] = _view(nuclei, start, (n_z, fov_h, fov_w))
                other[box] = _view(stain, start, (n_z, fov_h, fov_w))
            noise = rng.normal(0, 0.02, clean.shape).astype(np.float32)
            dapi = np.clip((clean * gain + noise) * 20000 + 500, 0, 65535)
            other = np.clip((other * rng.uniform(0.5, 2.0)) * 15000 + 300, 0, 65535)
            data = np.stack([dapi, other]).astype(np.uint16)
            image = _write_image(
                plate_url,
                well,
                acquisition,
                _to_axes(data, axes),
                axes=axes,
                channels=channels,
                pixel_size=pixel_size,
                z_spacing=z_spacing,
                levels=levels,
                ngff_version=ngff_version,
                chunks=chunks,
            )
            _write_roi_tables(image, fov_names, fov_origins, fov_shape, n_z, plate)
            if labels:
                mask = clean > 0.25
                nuclei_labels = connected_components(mask).astype(np.uint32)
                lab = image.derive_label("nuclei", overwrite=True)
                lab.set_array(_to_axes(nuclei_labels[None], axes.replace("c", "")))
                lab.consolidate(mode="auto")
            url = f"{plate_url}/{well[0]}/{well[1:]}/{acquisition}"
            plate.images.append(
                SyntheticImage(url, well[0], well[1:], str(acquisition), acquisition)
            )
            plate.translations_px[url] = {
                name: (float(offset[0]), float(offset[1]), float(offset[2]))
                for name, offset in zip(fov_names, offsets)
            }
    return plate


def _to_axes(data: np.ndarray, axes: str) -> np.ndarray:
    """Turn a (c, z, y, x) array into the requested on-disk axes."""
    if "z" not in axes:
        data = data[:, 0]
    if "c" not in axes:
        data = data[0]
    if "t" in axes:
        data = data[None]
    return data


def _write_image(plate_url, well, acquisition, data, *, axes, channels, **kwargs):
    """Write one acquisition's image with its pyramid into the plate."""
    options = dict(
        pixelsize=kwargs["pixel_size"],
        z_spacing=kwargs["z_spacing"],
        levels=kwargs["levels"],
        axes_names=axes,
        channels_meta=channels,
        ngff_version=kwargs["ngff_version"],
        consolidation_mode="auto",
        overwrite=True,
    )
    if kwargs["chunks"] is not None:
        options["chunks"] = kwargs["chunks"]
    url = f"{plate_url}/{well[0]}/{well[1:]}/{acquisition}"
    return create_ome_zarr_from_array(url, data, **options)


def _write_roi_tables(image, fov_names, fov_origins, fov_shape, n_z, plate) -> None:
    """Write ``FOV_ROI_table`` (one row per FOV) and ``well_ROI_table`` (µm)."""
    ps, zs = plate.pixel_size, plate.z_spacing
    fov_h, fov_w = fov_shape
    z = (0.0, n_z * zs)
    rois = [
        Roi.from_values(
            name=name,
            slices={"z": z, "y": (oy * ps, fov_h * ps), "x": (ox * ps, fov_w * ps)},
        )
        for name, (oy, ox) in zip(fov_names, fov_origins)
    ]
    shape = image.get_image().shape
    well = Roi.from_values(
        name="well_1",
        slices={"z": z, "y": (0.0, shape[-2] * ps), "x": (0.0, shape[-1] * ps)},
    )
    image.add_table("FOV_ROI_table", RoiTable(rois=rois), overwrite=True)
    image.add_table("well_ROI_table", RoiTable(rois=[well]), overwrite=True)
