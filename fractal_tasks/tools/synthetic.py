"""Synthetic multiplexed HCS plates with known shifts (demo, tests, benchmarks).

Each well is one continuous sample of nucleus-like objects: textured ellipses,
blurred by a PSF, stamped from a few pre-rendered templates. Every acquisition
(imaging cycle) images each field of view (FOV) through its own stage offset,
with its own background, gain per channel, staining of each object and noise.
The true translation of every FOV is known, so recovered shifts and registered
pixels can be checked.

Convention (the one the ROI tables use): the translation of an acquisition's FOV
is the shift that moves the acquisition onto the reference. If acquisition pixel
``q`` shows what reference pixel ``q + t`` shows, the translation is ``t``; it is
what ``skimage.registration.phase_cross_correlation(ref, acq)`` returns.

The plate is rendered and written one FOV at a time, then each image builds its
pyramid, so memory stays flat however big the plate (a 2x2-FOV 2160x2560 plate
takes seconds). ``build_synthetic_plate`` writes the small plates of the tests
and the demo; ``build_plate`` writes any ``SynthSpec`` (the benchmarks' plates).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ngio import (
    Channel,
    ImageInWellPath,
    Roi,
    RoiTable,
    create_empty_ome_zarr,
    create_empty_plate,
    open_ome_zarr_container,
)
from scipy import ndimage

from fractal_tasks.geometry import RigidTransform
from fractal_tasks.hcs.roi_tables import stored_transforms

REGISTRATION_WAVELENGTH = "A01_C01"
STAIN_WAVELENGTH = "A01_C02"
SUPPORTED_AXES = ("czyx", "zyx", "cyx", "yx", "tczyx", "tyx")
CHANNEL_LABELS = ("DAPI", "GFP", "mCherry")
LABEL_NAME = "nuclei"


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a synthetic plate.

    The defaults describe a plate as a Fractal converter writes it: 2x2 FOVs of
    2160x2560 px at 0.325 µm, 3 channels, 5 levels, NGFF 0.4, one FOV per chunk.
    """

    wells: tuple[str, ...] = ("B03",)
    n_acquisitions: int = 3
    fovs: tuple[int, int] = (2, 2)
    fov_shape: tuple[int, int] = (2160, 2560)
    n_z: int = 1
    n_channels: int = 3
    axes: str = "czyx"
    levels: int = 5
    pixel_size: float = 0.325
    z_spacing: float = 1.0
    ngff_version: Literal["0.4", "0.5"] = "0.4"
    # "fov": one FOV of one channel and plane per chunk, like the Fractal
    # converters; "auto": ngio's heuristic; or an explicit chunk shape.
    chunks: str | tuple[int, ...] = "fov"
    labels: bool = False  # a "nuclei" label image (channel 0's objects)
    # Largest |shift| in y and x, in level-0 px: the larger of max_shift_px and
    # max_shift_fraction times the FOV size. In z, whole planes.
    max_shift_px: float = 6.0
    max_shift_fraction: float = 0.0
    max_shift_z: int = 0
    subpixel: bool = False  # shifts in 1/8 px instead of whole pixels
    shift_per_well: bool = False  # every FOV of an acquisition moves alike
    # Per acquisition (index; missing: 0), its rotation in degrees about the
    # well's centre, as when a plate is re-seated in its holder; a rotated
    # acquisition's FOVs move as one piece (no jitter).
    rotation_deg: tuple[float, ...] = ()
    nucleus_radius: tuple[float, float] = (9.0, 17.0)
    area_per_nucleus: float = 2200.0
    # half-depth of an object in z: this fraction of the stack, plus one plane
    nucleus_depth: tuple[float, float] = (0.18, 0.35)
    background: float = 100.0
    read_noise: float = 10.0
    # "shot": fresh read and shot noise per pixel; "fast": read noise cut from
    # a pre-drawn bank (as compressible, about 4x faster to render).
    noise: Literal["shot", "fast"] = "shot"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.axes not in SUPPORTED_AXES:
            raise ValueError(f"axes={self.axes!r} is not one of {SUPPORTED_AXES}.")
        if self.n_z > 1 and "z" not in self.axes:
            raise ValueError(
                f"n_z={self.n_z} needs a 'z' axis, but axes={self.axes!r}."
            )
        if self.n_channels > 1 and "c" not in self.axes:
            raise ValueError(
                f"n_channels={self.n_channels} needs a 'c' axis, "
                f"but axes={self.axes!r}."
            )

    @property
    def well_shape(self) -> tuple[int, int]:
        """Level-0 (y, x) size of a well."""
        return (self.fovs[0] * self.fov_shape[0], self.fovs[1] * self.fov_shape[1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Level-0 (c, z, y, x) size of an image."""
        return (self.n_channels, self.n_z, *self.well_shape)

    @property
    def max_shift(self) -> tuple[float, float]:
        """Largest |shift| in (y, x), in level-0 pixels."""
        ms = [
            max(self.max_shift_px, self.max_shift_fraction * n) for n in self.fov_shape
        ]
        return ms[0], ms[1]

    @property
    def fov_names(self) -> list[str]:
        """``FOV_1``, ``FOV_2``, ... row by row."""
        return [f"FOV_{i + 1}" for i in range(self.fovs[0] * self.fovs[1])]

    def fov_origin(self, index: int) -> tuple[int, int]:
        """Level-0 (y, x) of the top-left pixel of the index-th FOV."""
        iy, ix = divmod(index, self.fovs[1])
        return iy * self.fov_shape[0], ix * self.fov_shape[1]

    @property
    def wavelength_ids(self) -> list[str]:
        """``A01_C01``, ``A01_C02``, ... one per channel."""
        return [f"A01_C{c + 1:02d}" for c in range(self.n_channels)]


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
    # zarr_url -> rotation in degrees (about every FOV's centre as well)
    rotations_deg: dict[str, float] = field(default_factory=dict)
    # seconds spent rendering, writing level 0 and building pyramids
    seconds: dict[str, float] = field(default_factory=dict)

    def true_translation_px(self, zarr_url: str, roi_name: str) -> tuple[float, ...]:
        """True (z, y, x) translation of one FOV, in level-0 pixels."""
        return self.translations_px[zarr_url][roi_name]

    def true_translation_um(self, zarr_url: str, roi_name: str) -> tuple[float, ...]:
        """True (z, y, x) translation of one FOV, in micrometres."""
        z, y, x = self.translations_px[zarr_url][roi_name]
        return (z * self.z_spacing, y * self.pixel_size, x * self.pixel_size)

    def corner_error(
        self,
        zarr_url: str,
        roi_name: str,
        box_px: dict[str, tuple[float, float]],
        stored: RigidTransform,
    ) -> float:
        """Largest gap (level-0 px) between a stored transform and the truth.

        The gap is between where the two put each of the FOV's corners.

        Args:
            zarr_url: The acquisition.
            roi_name: The FOV.
            box_px: Its ``{"y": (start, stop), "x": (start, stop)}`` in px.
            stored: The transform stored for it, in px.
        """
        true = self.true_translation_px(zarr_url, roi_name)
        centre = {a: (b + e) / 2 for a, (b, e) in box_px.items()}
        truth = RigidTransform(
            self.rotations_deg.get(zarr_url, 0.0),
            centre,
            {"y": true[1], "x": true[2]},
        )
        corners = np.array([(y, x) for y in box_px["y"] for x in box_px["x"]], float)
        gap = stored.apply_yx(corners) - truth.apply_yx(corners)
        return float(np.max(np.hypot(gap[:, 0], gap[:, 1])))

    def corner_errors(
        self, zarr_url: str, table: str = "FOV_ROI_table"
    ) -> dict[str, float]:
        """Per FOV, :meth:`corner_error` of the transform Calculate stored."""
        container = open_ome_zarr_container(zarr_url)
        rois = {str(r.name): r for r in container.get_roi_table(table).rois()}
        stored = stored_transforms(container, rois, zarr_url, table) or {}
        pixel = {"y": self.pixel_size, "x": self.pixel_size, "z": self.z_spacing}
        out = {}
        for name, motion in stored.items():
            box = {a: (rois[name][a].start, rois[name][a].end) for a in ("y", "x")}
            box_px = {a: (b / pixel[a], e / pixel[a]) for a, (b, e) in box.items()}
            out[name] = self.corner_error(
                zarr_url, name, box_px, motion.in_pixels(pixel)
            )
        return out

    def copied_to(self, target: str | Path) -> SyntheticPlate:
        """A copy of the plate's files at ``target``, and its truth there."""
        shutil.copytree(self.plate_url, target)
        old, new = self.plate_url, str(target)

        def moved(url: str) -> str:
            return url.replace(old, new)

        return replace(
            self,
            plate_url=new,
            images=[replace(i, zarr_url=moved(i.zarr_url)) for i in self.images],
            translations_px={moved(k): v for k, v in self.translations_px.items()},
            rotations_deg={moved(k): v for k, v in self.rotations_deg.items()},
        )

    def images_of_well(self, well: str) -> list[SyntheticImage]:
        """Images of one well (e.g. ``B03``), reference acquisition first."""
        return sorted(
            (i for i in self.images if i.well == well), key=lambda i: i.acquisition
        )

    def to_json(self) -> dict:
        """Plain-JSON description of the plate and its truth."""
        return json.loads(json.dumps(asdict(self)))


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
    rotation_deg: tuple[float, ...] = (),
) -> SyntheticPlate:
    """Write a small multiplexed HCS plate whose per-FOV shifts are known.

    Two channels (``DAPI`` = ``A01_C01`` and ``GFP`` = ``A01_C02``), objects
    sized to the FOV; ``build_plate`` with a ``SynthSpec`` sets everything.

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
        subpixel: Allow offsets in 1/8 pixel (in y and x), not whole pixels.
        levels: Pyramid levels (each halves y and x).
        pixel_size: Level-0 pixel size in y and x, in micrometres.
        z_spacing: Distance between z planes, in micrometres.
        ngff_version: ``"0.4"`` (zarr v2) or ``"0.5"`` (zarr v3).
        labels: Also write a ``nuclei`` label image in every acquisition.
        chunks: Chunk shape of the images (ngio's default when None).
        seed: Random seed; the same seed writes the same plate.
        rotation_deg: Per acquisition, its rotation in degrees about the
            well's centre (see ``SynthSpec.rotation_deg``).

    Returns:
        The plate's URL, its images and the true translation (and rotation)
        of every FOV.

    Raises:
        ValueError: On unsupported axes, or ``n_z > 1`` without a ``z`` axis.
    """
    radius = max(1.5, min(fov_shape) / 40)  # 3.2 px in a 128x160 FOV
    spec = SynthSpec(
        wells=tuple(wells),
        n_acquisitions=n_acquisitions,
        fovs=fovs,
        fov_shape=fov_shape,
        n_z=n_z,
        n_channels=2 if "c" in axes else 1,
        axes=axes,
        levels=levels,
        pixel_size=pixel_size,
        z_spacing=z_spacing,
        ngff_version=ngff_version,
        chunks="auto" if chunks is None else chunks,
        labels=labels,
        max_shift_px=0.0,
        max_shift_fraction=max_shift_fraction,
        max_shift_z=max_shift_z,
        subpixel=subpixel,
        rotation_deg=tuple(rotation_deg),
        nucleus_radius=(1.5 * radius, 3.0 * radius),
        area_per_nucleus=13.0 * (2.25 * radius) ** 2,
        nucleus_depth=(0.05, 0.15),
        seed=seed,
    )
    return build_plate(path, spec)


# --------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------


def _soft_ellipse(size, ry, rx, angle, steep):
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    ca, sa = math.cos(angle), math.sin(angle)
    u = (ca * xx + sa * yy) / rx
    v = (-sa * xx + ca * yy) / ry
    r = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp((r - 1.0) * steep))


def _make_templates(rng, spec: SynthSpec, kind: int, count: int = 16):
    """Pre-rendered, PSF-blurred objects; kind 0 nuclei, 1 cytoplasm, 2 spots."""
    out = []
    rmin, rmax = spec.nucleus_radius
    for _ in range(count):
        ra = rng.uniform(rmin, rmax)
        rb = ra * rng.uniform(0.65, 1.0)
        ang = rng.uniform(0, math.pi)
        if kind == 1:
            ra, rb = ra * 1.9, rb * 1.9
        size = int(2 * math.ceil(ra * (1.7 if kind == 1 else 1.0)) + 9)
        body = _soft_ellipse(size, rb, ra, ang, 10.0 if kind != 1 else 5.0)
        tex = ndimage.gaussian_filter(
            rng.standard_normal((size, size)).astype(np.float32), 1.5
        )
        if kind == 0:
            body = body * (0.8 + 0.6 * tex)
        elif kind == 1:
            body = 0.35 * body * (0.7 + 0.8 * tex)
        else:
            spots = (rng.random((size, size)) < 0.02).astype(np.float32) * 4.0
            body = body * (0.15 + ndimage.gaussian_filter(spots, 1.2) * 6.0)
        body = ndimage.gaussian_filter(np.clip(body, 0, None), 1.1)
        out.append(body.astype(np.float32))
    return out


class _Sample:
    """One well's continuous sample plus per-acquisition imaging parameters."""

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.templates = [
            _make_templates(rng, spec, kind=c % 3) for c in range(spec.n_channels)
        ]
        tmax = max(t.shape[0] for ts in self.templates for t in ts)
        msy, msx = spec.max_shift
        margin_y = int(math.ceil(msy)) + tmax + 8
        margin_x = int(math.ceil(msx)) + tmax + 8
        wy, wx = spec.well_shape
        area = (wy + 2 * margin_y) * (wx + 2 * margin_x)
        n = int(area / spec.area_per_nucleus)
        self.n = n
        self.cy = rng.integers(-margin_y, wy + margin_y, n)
        self.cx = rng.integers(-margin_x, wx + margin_x, n)
        self.kind = rng.integers(0, 16, n)
        self.amp = rng.lognormal(np.log(900.0), 0.45, (spec.n_channels, n))
        if spec.n_z > 1:
            mz = spec.max_shift_z
            self.zc = rng.uniform(-1 - mz, spec.n_z + mz, n)
            self.rz = rng.uniform(*spec.nucleus_depth, n) * spec.n_z + 1.0
        else:
            self.zc = np.zeros(n)
            self.rz = np.full(n, np.inf)
        # Per acquisition: background, per-channel gain, per-nucleus stain
        # variation (small for the registration channel 0, large otherwise).
        na = spec.n_acquisitions
        self.bg = rng.uniform(0.8, 1.2, na) * spec.background
        self.gain = rng.uniform(0.6, 1.6, (na, spec.n_channels))
        self.stain = np.empty((na, spec.n_channels, n))
        for a in range(na):
            for c in range(spec.n_channels):
                sigma = 0.12 if c == 0 else 0.6
                self.stain[a, c] = rng.lognormal(0.0, sigma, n)
        self.truth = self._draw_shifts(rng)
        self._rng_noise = np.random.default_rng(spec.seed + 1000)
        self._bank = None
        if spec.noise == "fast":
            size = max(1 << 23, 2 * spec.fov_shape[0] * spec.fov_shape[1])
            sd = math.sqrt(spec.read_noise**2 + 200.0)
            self._bank = (
                self._rng_noise.standard_normal(size, np.float32) * sd
            ).astype(np.int16)

    def _draw_shifts(self, rng) -> dict[tuple[int, str], tuple[float, float, float]]:
        """Per (acquisition, FOV name), the (z, y, x) truth.

        One common offset per acquisition plus a jitter per FOV (none with
        ``shift_per_well``); the reference's are zero.
        """
        spec = self.spec
        scale = np.array(spec.max_shift)
        mz = spec.max_shift_z
        out = {}
        for a in range(spec.n_acquisitions):
            base = rng.uniform(-0.75, 0.75, 2) * scale
            base_z = rng.uniform(-0.75, 0.75) * mz if mz else 0.0
            for name in spec.fov_names:
                if a == 0:
                    out[(a, name)] = (0.0, 0.0, 0.0)
                    continue
                jit = rng.uniform(-0.25, 0.25, 2) * scale
                jit_z = rng.uniform(-0.25, 0.25) * mz if mz else 0.0
                if spec.shift_per_well or self.rotation(a):
                    jit, jit_z = jit * 0, 0.0  # the whole well moved as one piece
                t = base + jit
                # a subpixel shift keeps a clear fractional part
                t = np.round(t * 8) / 8.0 if spec.subpixel else np.round(t)
                if self.rotation(a):  # the FOV's centre moves with the well
                    centre = self.fov_centre(name)
                    t = self.well_motion(a, t).apply_yx(centre) - centre
                out[(a, name)] = (
                    float(round(base_z + jit_z)),
                    float(t[0]),
                    float(t[1]),
                )
        return out

    def rotation(self, a: int) -> float:
        """Rotation of acquisition ``a`` in degrees (0 for the reference)."""
        angles = self.spec.rotation_deg
        return float(angles[a]) if 0 < a < len(angles) else 0.0

    def fov_centre(self, name: str) -> np.ndarray:
        """(y, x) centre of a FOV in the well, continuous level-0 px."""
        oy, ox = self.spec.fov_origin(self.spec.fov_names.index(name))
        fy, fx = self.spec.fov_shape
        return np.array([oy + fy / 2, ox + fx / 2])

    def well_motion(self, a: int, translation: np.ndarray) -> RigidTransform:
        """Where acquisition ``a``'s points (y, x) lie in the reference.

        A rotation about the well's centre, then ``translation`` (continuous
        level-0 px).
        """
        centre = dict(zip("yx", np.array(self.spec.well_shape) / 2))
        shift = dict(zip("yx", map(float, translation)))
        return RigidTransform(self.rotation(a), centre, shift)

    def _rotated(self, a, fov_index, name, render, order):
        """A FOV of a rotated acquisition, as a function of the plane.

        ``render(plane, y0, x0, h, w)`` draws the sample around where the
        FOV's pixels lie; it is resampled at their points.
        """
        spec = self.spec
        fy, fx = spec.fov_shape
        oy, ox = spec.fov_origin(fov_index)
        fov_t = np.array(self.truth[(a, name)][1:])
        centre = self.fov_centre(name)
        # the FOV moves as the well does: about its own centre, by its truth
        motion = RigidTransform(
            self.rotation(a), dict(zip("yx", centre)), dict(zip("yx", fov_t))
        )
        grid = np.stack(
            np.meshgrid(
                oy + np.arange(fy) + 0.5, ox + np.arange(fx) + 0.5, indexing="ij"
            ),
            axis=-1,
        )
        points = motion.apply_yx(grid) - 0.5
        y0 = int(math.floor(points[..., 0].min())) - 4
        x0 = int(math.floor(points[..., 1].min())) - 4
        h = int(math.ceil(points[..., 0].max())) + 5 - y0
        w = int(math.ceil(points[..., 1].max())) + 5 - x0
        where = [points[..., 0] - y0, points[..., 1] - x0]

        def resampled(plane):
            drawn = render(plane, y0, x0, h, w)
            planes = drawn if drawn.ndim == 3 else drawn[None]
            out = [
                ndimage.map_coordinates(p, where, order=order, mode="nearest")
                for p in planes
            ]
            return np.stack(out) if drawn.ndim == 3 else out[0]

        return resampled

    def render_signal(self, c, z, a, y0, x0, h, w):
        """Noise-free signal of channel c, plane z, acq a on a window."""
        out = np.zeros((h, w), np.float32)
        tmpl = self.templates[c]
        sel = self._overlapping(tmpl, y0, x0, h, w)
        if self.spec.n_z > 1:
            dz = (z - self.zc) / self.rz
            wz = np.sqrt(np.clip(1.0 - dz * dz, 0.0, None))
            sel &= wz > 0
        else:
            wz = np.ones(self.n)
        idx = np.nonzero(sel)[0]
        amps = self.amp[c, idx] * self.stain[a, c, idx] * wz[idx]
        for i, amp in zip(idx, amps, strict=True):
            t = tmpl[self.kind[i]]
            where = self._stamp(i, t.shape[0], y0, x0, h, w)
            if where is not None:
                out[where[0]] += t[where[1]] * amp
        return out

    def _overlapping(self, templates, y0, x0, h, w):
        """Which objects (their templates) reach into the window."""
        half = np.array([t.shape[0] // 2 for t in templates])[self.kind]
        return (
            (self.cy + half >= y0)
            & (self.cy - half < y0 + h)
            & (self.cx + half >= x0)
            & (self.cx - half < x0 + w)
        )

    def _stamp(self, i, size, y0, x0, h, w):
        """Where object i's template of ``size`` meets the window.

        (window slices, template slices) for the window at (y0, x0) of h x w;
        None if they do not overlap.
        """
        ty0 = self.cy[i] - size // 2 - y0
        tx0 = self.cx[i] - size // 2 - x0
        oy0, ox0 = max(ty0, 0), max(tx0, 0)
        oy1, ox1 = min(ty0 + size, h), min(tx0 + size, w)
        if oy1 <= oy0 or ox1 <= ox0:
            return None
        inside = (slice(oy0, oy1), slice(ox0, ox1))
        return inside, (slice(oy0 - ty0, oy1 - ty0), slice(ox0 - tx0, ox1 - tx0))

    def render_fov(self, a, fov_index, name):
        """uint16 (C, Z, Y, X) block of acquisition a for one FOV."""
        spec = self.spec
        fy, fx = spec.fov_shape
        oy, ox = spec.fov_origin(fov_index)
        tz, ty, tx = self.truth[(a, name)]
        iy, ix = math.floor(ty), math.floor(tx)
        fr_y, fr_x = ty - iy, tx - ix
        pad = 4 if (fr_y or fr_x) else 0
        block = np.empty((spec.n_channels, spec.n_z, fy, fx), np.uint16)
        rotated = None
        if self.rotation(a):
            rotated = self._rotated(
                a,
                fov_index,
                name,
                lambda cz, y0, x0, h, w: self.render_signal(
                    cz[0], cz[1] + tz, a, y0, x0, h, w
                ),
                order=3,
            )
        for c in range(spec.n_channels):
            for z in range(spec.n_z):
                if rotated is not None:
                    sig = rotated((c, z)).astype(np.float32)
                else:
                    sig = self.render_signal(
                        c,
                        z + tz,
                        a,
                        oy + iy - pad,
                        ox + ix - pad,
                        fy + 2 * pad,
                        fx + 2 * pad,
                    )
                if pad and rotated is None:
                    sig = ndimage.shift(sig, (-fr_y, -fr_x), order=3, mode="nearest")
                    sig = sig[pad : pad + fy, pad : pad + fx]
                sig *= self.gain[a, c]
                if self._bank is not None:
                    o = int(self._rng_noise.integers(0, self._bank.size - fy * fx))
                    sig += self._bank[o : o + fy * fx].reshape(fy, fx)
                else:
                    noise = self._rng_noise.standard_normal((fy, fx), dtype=np.float32)
                    # read noise + approximate shot noise
                    noise *= np.sqrt(spec.read_noise**2 + 0.5 * sig)
                    sig += noise
                sig += self.bg[a]
                np.clip(sig, 0, 65535, out=sig)
                block[c, z] = sig
        return block

    def render_labels(self, a, fov_index, name):
        """uint32 (Z, Y, X) nuclei labels of acquisition a for one FOV.

        Object i of channel 0 gets label i + 1 where its template exceeds a
        quarter of its maximum; it sits where the acquisition sees it
        (rounded shift), so labels move with the intensities.
        """
        spec = self.spec
        fy, fx = spec.fov_shape
        oy, ox = spec.fov_origin(fov_index)
        tz, ty, tx = self.truth[(a, name)]
        if self.rotation(a):
            rotated = self._rotated(
                a,
                fov_index,
                name,
                lambda _, y0, x0, h, w: self._labels_at(tz, y0, x0, h, w),
                order=0,
            )
            return rotated(None)
        return self._labels_at(tz, oy + int(round(ty)), ox + int(round(tx)), fy, fx)

    def _labels_at(self, tz, y0, x0, fy, fx):
        """uint32 (Z, Y, X) labels of the sample on a window (z moved by tz)."""
        spec = self.spec
        tmpl = self.templates[0]
        masks = [t > 0.25 * t.max() for t in tmpl]
        sel = self._overlapping(tmpl, y0, x0, fy, fx)
        out = np.zeros((spec.n_z, fy, fx), np.uint32)
        for i in np.nonzero(sel)[0]:
            m = masks[self.kind[i]]
            where = self._stamp(i, m.shape[0], y0, x0, fy, fx)
            if where is None:
                continue
            inside, sub = where[0], m[where[1]]
            if spec.n_z > 1:
                dz = (np.arange(spec.n_z) + tz - self.zc[i]) / self.rz[i]
                planes = np.nonzero(np.abs(dz) < 1.0)[0]
            else:
                planes = np.array([0])
            for z in planes:
                out[z][inside][sub] = i + 1
        return out


# --------------------------------------------------------------------------
# Plate writing (ngio 1.1)
# --------------------------------------------------------------------------


def build_plate(path: str | Path, spec: SynthSpec) -> SyntheticPlate:
    """Write the plate of ``spec`` at ``path`` (replaced if present), FOV by FOV.

    Wells after the first draw their sample from seeds of their own.
    """
    plate_url = str(path)
    create_empty_plate(
        store=plate_url,
        name=Path(plate_url).stem,
        images=[
            ImageInWellPath(row=w[0], column=w[1:], path=str(a), acquisition_id=a)
            for w in spec.wells
            for a in range(spec.n_acquisitions)
        ],
        ngff_version=spec.ngff_version,
        overwrite=True,
    )
    plate = SyntheticPlate(
        plate_url=plate_url,
        images=[],
        pixel_size=spec.pixel_size,
        z_spacing=spec.z_spacing,
        fov_names=spec.fov_names,
    )
    labels = [*CHANNEL_LABELS, *(f"ch{c}" for c in range(3, spec.n_channels))]
    channels = [
        Channel.default_init(label=label, wavelength_id=w)
        for label, w in zip(labels, spec.wavelength_ids)
    ]
    seconds = [0.0, 0.0, 0.0]
    for index, well in enumerate(spec.wells):
        sample = _Sample(replace(spec, seed=spec.seed + 7919 * index))
        for a in range(spec.n_acquisitions):
            url = f"{plate_url}/{well[0]}/{well[1:]}/{a}"
            container = create_empty_ome_zarr(
                url,
                shape=_axes_shape(spec, {"c": spec.n_channels, "z": spec.n_z}),
                pixelsize=spec.pixel_size,
                z_spacing=spec.z_spacing,
                axes_names=spec.axes,
                levels=spec.levels,
                channels_meta=channels,
                dtype="uint16",
                chunks=_chunks(spec),
                ngff_version=spec.ngff_version,
                overwrite=True,
            )
            image = container.get_image()
            _fill(spec, image, sample.render_fov, a, spec.axes, seconds, order="linear")
            if spec.labels:
                label = container.derive_label(LABEL_NAME, overwrite=True)
                axes = spec.axes.replace("c", "")
                _fill(spec, label, sample.render_labels, a, axes, seconds)
            _write_roi_tables(container, spec)
            plate.images.append(SyntheticImage(url, well[0], well[1:], str(a), a))
            plate.translations_px[url] = {
                name: sample.truth[(a, name)] for name in spec.fov_names
            }
            plate.rotations_deg[url] = sample.rotation(a)
    plate.seconds = dict(zip(("render", "write_level0", "pyramid"), seconds))
    return plate


def _axes_shape(spec: SynthSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """The per-axis sizes of an image, y and x from ``spec``, others from sizes."""
    sizes = {"t": 1, "y": spec.well_shape[0], "x": spec.well_shape[1], **sizes}
    return tuple(sizes[a] for a in spec.axes)


def _chunks(spec: SynthSpec) -> tuple[int, ...] | Literal["auto"]:
    if spec.chunks == "fov":
        return _axes_shape(
            spec, {"c": 1, "z": 1, "y": spec.fov_shape[0], "x": spec.fov_shape[1]}
        )
    if isinstance(spec.chunks, tuple):
        return spec.chunks
    return "auto"


def _to_axes(data: np.ndarray, axes: str) -> np.ndarray:
    """Turn a (c, z, y, x) array into the on-disk axes."""
    if "z" not in axes:
        data = data[:, 0]
    if "c" not in axes:
        data = data[0]
    if "t" in axes:
        data = data[None]
    return data


def _fill(spec, image, render, a, axes, seconds, **consolidate: Any) -> None:
    """Render and write every FOV of acquisition ``a``, then build the pyramid.

    ``image`` is an ngio image or label; the seconds spent rendering, writing
    and building the pyramid are added to ``seconds``.
    """
    array = image.zarr_array
    fy, fx = spec.fov_shape
    for i, name in enumerate(spec.fov_names):
        ta = time.perf_counter()
        block = render(a, i, name)
        if block.ndim == 3:  # labels: (z, y, x)
            block = block[None]
        tb = time.perf_counter()
        oy, ox = spec.fov_origin(i)
        array[..., oy : oy + fy, ox : ox + fx] = _to_axes(block, axes)
        seconds[0] += tb - ta
        seconds[1] += time.perf_counter() - tb
    tc = time.perf_counter()
    image.consolidate(mode="auto", **consolidate)
    seconds[2] += time.perf_counter() - tc


def _write_roi_tables(container, spec: SynthSpec) -> None:
    """Write ``FOV_ROI_table`` (one row per FOV) and ``well_ROI_table`` (µm)."""
    ps = spec.pixel_size
    fy, fx = spec.fov_shape
    z = (0.0, spec.n_z * spec.z_spacing)
    rois = []
    for i, name in enumerate(spec.fov_names):
        oy, ox = spec.fov_origin(i)
        slices = {"z": z, "y": (oy * ps, fy * ps), "x": (ox * ps, fx * ps)}
        rois.append(Roi.from_values(name=name, slices=slices))
    wy, wx = spec.well_shape
    well = Roi.from_values(
        name="well_1", slices={"z": z, "y": (0.0, wy * ps), "x": (0.0, wx * ps)}
    )
    container.add_table("FOV_ROI_table", RoiTable(rois=rois), overwrite=True)
    container.add_table("well_ROI_table", RoiTable(rois=[well]), overwrite=True)
