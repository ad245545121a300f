"""Per-ROI translation between an acquisition and its reference, with a verdict.

Reads only the registration channel, ROI by ROI (in parallel threads), at the
chosen pyramid level, or at a finer one for a ROI too small there; estimates
each ROI's shift, judges it by the evidence of its own registration, and
replaces the shift of a failed ROI by the median of the good ROIs of the same
acquisition (in a well that turned, by the shift of its centre under the
well's motion fitted to them).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
from ngio import OmeZarrContainer, Roi
from ngio.tables import ConditionTable
from ngio.utils import NgioValueError

from fractal_tasks.geometry import (
    MOVES_NO_PIXEL,
    Box,
    ImageGeometry,
    RigidTransform,
    corner_displacement,
    crop_to_common,
    roi_box,
    same_pixel_size,
)
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.roi_tables import (
    ROTATION_COLUMN,
    by_name,
    quality_table_name,
    slices_um,
    spatial_geometry,
)
from fractal_tasks.registration.rotation import (
    MAX_ROTATION_DEG,
    ROTATION_RESIDUAL,
    RotationEstimate,
    derotate,
    estimate_rotation,
)
from fractal_tasks.registration.shift import (
    CONFIRM_FINER,
    NCC_AFTER,
    NCC_GAIN,
    PEAK_SIGNIFICANCE,
    SATURATED,
    UNCERTAINTY,
    RegistrationMethod,
    RegistrationStatus,
    ShiftEstimate,
    Verdict,
    estimate_shift,
    judge_estimate,
    judge_estimates,
    load_chi2_shift,
)

logger = logging.getLogger(__name__)

TransformModel = Literal["translation", "rigid"]

WELL_ANGLE_AGREEMENT_DEG = 0.02
"""ROIs whose angles all lie this close to their weighted mean (or within 3
of their own standard deviations) moved as one piece: under the rigid model
they all get that one angle, measured on all of them."""

MIN_ROI_PX = 32
"""Smallest ROI size in y and x, in pixels of the level read, for a reliable
estimate; a smaller ROI is read at the coarsest finer level where it is at
least this large (or at level 0)."""

OUTLIER_FLOOR_PX = 3.0
"""Smallest outlier distance, in pixels of ``level_path`` (3 px at a 4x
downsampled level is 12 level-0 px, about 4 µm at 0.33 µm/px)."""

RETRY_MAX_PX = 2**23
"""Largest ROI, in pixels (voxels in 3D) per image of the pair, read at a finer
level when the estimate at the ROI's level fails its evidence. 2**23 (8.4 Mpx,
34 MB per image as float32 before the FFTs) holds a whole sCMOS frame
(2048x2048, 2160x2560, 2304x2304 px) at level 0, so a failed field of view can
be retried down to full resolution; a whole-well ROI (10^8 px at level 0) or a
3D stack at full resolution stops at the finest level where it fits."""

REFERENCE_READS_MAX_BYTES = 2**28
"""The most reference pixels (256 MiB) a :class:`ReferenceReads` keeps. A
well's 3x3 FOVs of 2160x2560 px at level 2 take 6 MB, the whole well at level
0 100 MB: reads beyond the budget are made again for each acquisition."""

QUALITY_COLUMNS = {
    "registration_status": "`ok`, `rotated` (translation kept, but the ROI is "
    "rotated beyond what the translation model can leave: see `residual_px`), "
    "`fallback` (replaced by the median of the good ROIs, or in a well that "
    "turned by its centre's shift under the well's fitted motion) or `failed` (no good "
    "ROI and `keep_zero_if_all_failed=True`)",
    "registration_note": "why a ROI is not `ok`",
    "ncc_before": "normalized cross-correlation (-1..1) of the prepared "
    "registration channel (rescaled, smooth background removed) without the shift",
    "ncc_after": "the same with the shift, rounded to whole pixels; "
    f"{NCC_AFTER.needed} is needed, and {NCC_GAIN.needed} for "
    f"`{NCC_GAIN.column}`",
    "peak_significance": "height of the correlation peak in robust standard "
    "deviations of the fine band of the correlation surface; "
    f"{PEAK_SIGNIFICANCE.needed} is needed",
    "peak_elongation": "ratio of the peak's widths along its principal directions "
    "in y/x (about 1: round; a ridge: an edge that fixes the shift across it, "
    f"not along it); not a verdict: above {CONFIRM_FINER.limit:g} the ROI is "
    "confirmed at the finer levels",
    "uncertainty_px": "how far the match slides (level-0 px) along the direction "
    "the content fixes least, when one image's frame moves that way by a few "
    f"pixels (about 0: fixed; an edge or a rim lets it slide); {UNCERTAINTY.needed} "
    "is needed",
    "uncertainty_direction_deg": "that direction, degrees from the x axis towards "
    "y (0..180)",
    "saturated": "share (0..1) of the overlap where either image is at its "
    f"maximum value (clipped); {SATURATED.needed} is needed",
    "level_path": "the level the ROI was read at",
    ROTATION_COLUMN: "the rotation about the ROI's centre that the stored "
    'transform applies (0 under `transform="translation"`, and where it '
    f"would move no point by {MOVES_NO_PIXEL:g} px); positive turns x towards "
    "y, clockwise on screen",
    "measured_rotation_deg": "the rotation measured on this ROI, whatever the "
    "model (under `rigid`: the rotation undone plus what is measured left "
    "after it; NaN: too small, too little structure, or content that does "
    "not fix a rotation, such as a rim or a ring about the centre)",
    "rotation_uncertainty_deg": "one standard deviation of the measured rotation",
    "residual_px": "the largest displacement (level-0 px, at the ROI's "
    "corners) that the measured rotation leaves after the stored transform; "
    f"{ROTATION_RESIDUAL.needed} under the translation model, else `rotated`",
}
"""The quality table's columns and what each holds; the docs are generated
from it (``fractal_tasks.dev.docs``)."""


@dataclass(frozen=True)
class RoiEstimate:
    """One ROI's estimate, and the level it was made at."""

    estimate: ShiftEstimate  # with the rotation undone first, for a rigid ROI
    level_path: str
    pixel_um: dict[str, float]  # pixel size of that level, per spatial axis
    rotation: RotationEstimate
    centre_um: dict[str, float]  # y, x: centre of the pixels read, in µm
    turn_deg: float = 0.0  # the rotation the rigid model gives it (0: none)
    turn_how: str = ""  # how that angle was chosen, for the note

    def translation_um(self) -> dict[str, float]:
        """The estimated shift in µm per spatial axis."""
        shift = self.estimate.shift[-len(self.pixel_um) :]
        return {a: float(s) * p for (a, p), s in zip(self.pixel_um.items(), shift)}


@dataclass(frozen=True)
class RoiRegistration:
    """Outcome for one ROI: translation in µm per spatial axis, and its quality."""

    name: str
    transform: RigidTransform  # in µm, about the ROI's centre
    roi_estimate: RoiEstimate
    status: RegistrationStatus
    note: str
    residual_px: float

    @property
    def translation_um(self) -> dict[str, float]:
        """The displacement of the ROI's centre, in µm per spatial axis."""
        return dict(self.transform.translation)

    def translation_columns(self) -> dict[str, float]:
        """The ROI-table columns of fractal-tasks-core: ``translation_z/y/x``."""
        t = self.translation_um
        return {f"translation_{a}": t.get(a, 0.0) for a in ("z", "y", "x")}

    def quality_row(self) -> dict[str, object]:
        """This ROI's row of the quality table (see ``QUALITY_COLUMNS``)."""
        e = self.roi_estimate.estimate
        return {
            "registration_status": self.status.value,
            "registration_note": self.note,
            "ncc_before": e.ncc_before,
            "ncc_after": e.ncc_after,
            "peak_significance": e.peak_significance,
            "peak_elongation": e.peak_elongation,
            "uncertainty_px": e.uncertainty_px,
            "uncertainty_direction_deg": e.uncertainty_direction_deg,
            "saturated": e.saturated,
            "level_path": self.roi_estimate.level_path,
            ROTATION_COLUMN: self.transform.rotation_deg,
            "measured_rotation_deg": self.roi_estimate.rotation.angle_deg,
            "rotation_uncertainty_deg": self.roi_estimate.rotation.uncertainty_deg,
            "residual_px": self.residual_px,
        }


def channel_index(image, identifier: str, zarr_url: str) -> int:
    """Index of the channel with this wavelength id, or else this label.

    Raises:
        RegistrationInputError: If no channel has that wavelength id or label.
    """
    for key in ("wavelength_id", "channel_label"):
        try:
            return image.get_channel_idx(**{key: identifier})
        except NgioValueError:
            pass
    known = [(c.wavelength_id, c.label) for c in image.channels_meta.channels]
    raise RegistrationInputError(
        f"No channel with wavelength id or label {identifier!r} in {zarr_url!r} "
        f"(channels as (wavelength_id, label): {known}). Set wavelength_id (and "
        "reference_wavelength_id, for the reference) to one of them."
    )


def level_image(container: OmeZarrContainer, level_path: str, zarr_url: str):
    """The image at pyramid level ``level_path``.

    Raises:
        RegistrationInputError: If the image has no such level.
    """
    if level_path not in container.level_paths:
        raise RegistrationInputError(
            f"level_path={level_path!r} does not exist in {zarr_url!r} (levels: "
            f"{container.level_paths}). Choose one of them."
        )
    return container.get_image(path=level_path)


def channel_reader(image, channel: int, zarr_url: str) -> Callable[[Box], np.ndarray]:
    """Function reading the registration channel of a box, as (z, y, x) or (y, x)."""
    axes = image.axes
    if "t" in axes and image.shape[axes.index("t")] > 1:
        raise RegistrationInputError(
            f"{zarr_url!r} is a time series ({image.shape[axes.index('t')]} time "
            "points); registration needs one time point per image. Split the time "
            "points into separate images (or project them) before registering."
        )
    array = image.zarr_array

    def read(box: Box) -> np.ndarray:
        spatial = box.slices()
        index: list[int | slice] = []
        for axis in axes:
            if axis == "c":
                index.append(channel)
            elif axis == "t":
                index.append(0)
            else:
                index.append(spatial[axis])
        return np.asarray(array[tuple(index)])

    return read


class ReferenceReads:
    """The reference's ROI pixels, read once for all acquisitions of one call.

    Calculate registers the acquisitions of a well onto one reference in one
    process; their ROIs cover the same boxes of the reference, so each box is
    read once per level. The arrays are read-only: the estimators copy before
    they change anything. Safe to use from the ROI threads.
    """

    def __init__(self, max_bytes: int = REFERENCE_READS_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._kept: dict[tuple[str, Box], np.ndarray] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def reader(
        self, path: str, read: Callable[[Box], np.ndarray]
    ) -> Callable[[Box], np.ndarray]:
        """``read`` at level ``path``, answered from what was read before."""

        def cached(box: Box) -> np.ndarray:
            key = (path, box)
            with self._lock:
                if key in self._kept:
                    return self._kept[key]
            pixels = read(box)
            pixels.setflags(write=False)
            with self._lock:
                fits = self._bytes + pixels.nbytes <= self._max_bytes
                if fits and key not in self._kept:  # a thread may have read it too
                    self._kept[key] = pixels
                    self._bytes += pixels.nbytes
            return pixels

        return cached


@dataclass(frozen=True)
class LevelPair:
    """The registration channels of a reference and an acquisition at one level.

    The one reader of ROI pairs, for calculate and the QC picture.
    """

    path: str
    readers: tuple[Callable[[Box], np.ndarray], Callable[[Box], np.ndarray]]
    geometries: tuple[ImageGeometry, ImageGeometry]

    def boxes(self, rois: tuple[Roi, Roi]) -> tuple[Box, Box]:
        """Each ROI's box in its own image's pixels at this level (may be empty)."""
        return tuple(  # type: ignore[return-value]
            roi_box(slices_um(roi), geometry.pixel_um, geometry.shape)
            for roi, geometry in zip(rois, self.geometries)
        )

    def read(self, rois: tuple[Roi, Roi]) -> tuple[np.ndarray, np.ndarray]:
        """The pixels of both ROIs, cut to the size both have."""
        boxes = crop_to_common(*self.boxes(rois))
        reference, acquisition = (read(b) for read, b in zip(self.readers, boxes))
        return reference, acquisition

    def pixels(self, rois: tuple[Roi, Roi]) -> int:
        """Pixels (voxels in 3D) per image that :meth:`read` would read."""
        return int(np.prod(crop_to_common(*self.boxes(rois))[0].shape))


def open_level_pair(
    containers: tuple[OmeZarrContainer, OmeZarrContainer],
    channels: tuple[str, str],
    urls: tuple[str, str],
    path: str,
    reference_reads: ReferenceReads | None = None,
) -> LevelPair:
    """Open the registration channel of both images at level ``path``.

    Args:
        containers: Reference and acquisition.
        channels: Their registration channels (wavelength id or label).
        urls: Their URLs, for messages.
        path: The pyramid level.
        reference_reads: Where the reference's pixels are kept across
            acquisitions, if they are.

    Raises:
        RegistrationInputError: For a missing level or channel, a time series,
            or pixel sizes that differ between the two images.
    """
    images = [level_image(c, path, u) for c, u in zip(containers, urls)]
    readers = tuple(
        channel_reader(image, channel_index(image, channel, url), url)
        for image, channel, url in zip(images, channels, urls)
    )
    if reference_reads is not None:
        readers = (reference_reads.reader(path, readers[0]), readers[1])
    geometries = tuple(spatial_geometry(image) for image in images)
    if not same_pixel_size(geometries[0].pixel_um, geometries[1].pixel_um):
        raise RegistrationInputError(
            f"Pixel sizes differ at level {path}: reference "
            f"{geometries[0].pixel_um} µm, acquisition {geometries[1].pixel_um} "
            "µm. Registration only shifts images; resample the acquisitions to "
            "the reference's pixel size first."
        )
    return LevelPair(path, readers, geometries)  # type: ignore[arg-type]


def _level_for(roi_boxes: Callable[[str], tuple[Box, Box]], paths: list[str]) -> str:
    """The coarsest of ``paths`` (coarse to fine) where the ROI is large enough."""
    for path in paths:
        size = min(min(box.shape[-2:]) for box in roi_boxes(path))
        if size >= MIN_ROI_PX:
            return path
    return paths[-1]


def estimate_with_retry(
    read_pair: Callable[[str], tuple[np.ndarray, np.ndarray]],
    paths: Sequence[str],
    *,
    pixels: Callable[[str], int],
    level0_px: Callable[[str], float] | None = None,
    max_pixels: int = RETRY_MAX_PX,
    first: ShiftEstimate | None = None,
    **options: Any,
) -> tuple[ShiftEstimate, str]:
    """The estimate at ``paths[0]``, or at the first finer level where it passes.

    When the estimate at ``paths[0]`` fails its own evidence (see
    :func:`judge_estimate`), the ROI is estimated at each finer level in turn
    (``paths[1]``, ``paths[2]``, ...) until an estimate passes, and that one is
    kept: a lone cell at a border, or an edge, may be too little at a 4x
    downsampled level and enough at a 2x one or at full resolution. An
    estimate that passes but whose peak is elongated (``CONFIRM_FINER``) is
    confirmed the same way: the finest estimate that passes is kept, and the
    search stops at one whose peak is round. Only those ROIs pay for the finer
    reads, and a finer level is read only while the ROI there is at most
    ``max_pixels`` per image. When no level passes, the estimate at
    ``paths[0]`` is kept (and judged failed).

    Args:
        read_pair: Reads ``(reference, acquisition)`` pixels of the ROI at a
            level path.
        paths: Level paths, coarse to fine, starting at the ROI's level.
        pixels: Pixels (voxels in 3D) of the ROI per image at a level path,
            without reading them.
        level0_px: The size of a pixel of a level path in level-0 pixels
            (see :func:`estimate_shift`); None: 1 at every level.
        max_pixels: Largest ROI read at a finer level (see ``RETRY_MAX_PX``);
            the ROI's own level ``paths[0]`` is always read.
        first: The estimate at ``paths[0]`` when already made.
        **options: Passed to :func:`estimate_shift`.

    Returns:
        The estimate kept and the path of its level.
    """

    def estimate(path: str) -> ShiftEstimate:
        scale = 1.0 if level0_px is None else level0_px(path)
        return estimate_shift(*read_pair(path), level0_px=scale, **options)

    if first is None:
        first = estimate(paths[0])
    kept = (first, paths[0])
    if judge_estimate(first).good and CONFIRM_FINER.holds(first.peak_elongation):
        return kept
    for path in paths[1:]:
        if pixels(path) > max_pixels:
            break  # finer levels are larger still
        finer = estimate(path)
        if judge_estimate(finer).good:
            kept = (finer, path)  # finer and passing: the better
            if CONFIRM_FINER.holds(finer.peak_elongation):
                break
    return kept


def estimate_rois(
    reference: OmeZarrContainer,
    acquisition: OmeZarrContainer,
    reference_rois: dict[str, Roi],
    acquisition_rois: dict[str, Roi],
    *,
    urls: tuple[str, str],
    channels: tuple[str, str],
    level_path: str,
    method: RegistrationMethod,
    quantiles: tuple[float, float],
    workers: int,
    transform: TransformModel = "translation",
    level0_pixel_um: dict[str, float] | None = None,
    reference_reads: ReferenceReads | None = None,
) -> dict[str, RoiEstimate]:
    """Estimate the shift and rotation of every ROI, at ``level_path`` or finer.

    Args:
        reference: The reference acquisition's image.
        acquisition: The image to register.
        reference_rois: The reference's ROIs by name.
        acquisition_rois: The acquisition's ROIs, the same names.
        urls: ``(reference_url, zarr_url)``, for messages.
        channels: Registration channel (wavelength id or label) of the
            reference and of the acquisition.
        level_path: Pyramid level to read. A ROI smaller than ``MIN_ROI_PX``
            in y or x there is read at the coarsest finer level where it is
            not (or at the finest level); a ROI whose estimate fails its own
            evidence is tried at each finer level in turn, while the ROI
            there is at most ``RETRY_MAX_PX`` px, until one passes (see
            :func:`estimate_with_retry`). The log says so.
        method: See :class:`RegistrationMethod`.
        quantiles: Lower and upper rescale quantiles.
        workers: Threads estimating ROIs at once.
        transform: The model. The rotation is measured under both: at the
            level the shift was kept at under ``"translation"``. Under
            ``"rigid"``, first for every ROI at its level; then each ROI gets
            its angle (:func:`rigid_angles`, from the ROIs whose angle is
            reliable, :func:`reliable_rois`), and where that moves the ROI's
            corners by ``MOVES_NO_PIXEL`` level-0 px or more, the shift and
            its evidence are estimated with the rotation undone, at every
            level read, and what is left of the rotation is measured again.
        level0_pixel_um: Pixel size of level 0 (default: that of
            ``level_path``), the unit of ``MOVES_NO_PIXEL`` and of each
            estimate's ``uncertainty_px``.
        reference_reads: Keeps the reference's pixels for the next
            acquisition registered onto it (see :class:`ReferenceReads`).

    Raises:
        RegistrationInputError: For a missing level or channel, pixel sizes
            that differ, a ROI outside an image, a time series, or chi2_shift
            on 3D images.
        ModuleNotFoundError: For chi2_shift without its optional package
            (see :func:`~fractal_tasks.registration.shift.load_chi2_shift`).
    """
    if method is RegistrationMethod.CHI2_SHIFT:
        load_chi2_shift()  # a missing optional package fails before any read
    containers = (reference, acquisition)

    def open_level(path: str) -> LevelPair:
        return open_level_pair(containers, channels, urls, path, reference_reads)

    levels = {level_path: open_level(level_path)}
    geometry = levels[level_path].geometries[0]
    if method is RegistrationMethod.CHI2_SHIFT and geometry.shape.get("z", 1) > 1:
        raise RegistrationInputError(
            f"method='chi2_shift' works on 2D images, but {urls[1]!r} has "
            f"{geometry.shape['z']} z planes. Use 'phase_cross_correlation'."
        )
    paths = list(reference.level_paths)
    finer = paths[: paths.index(level_path) + 1][::-1]  # coarse to fine

    opening = threading.Lock()

    def level(path: str) -> LevelPair:
        with opening:  # ROIs run in threads; open each level once
            if path not in levels:
                levels[path] = open_level(path)
            return levels[path]

    def boxes_at(rois: tuple[Roi, Roi], path: str) -> tuple[Box, Box]:
        return level(path).boxes(rois)

    names = list(reference_rois)
    pairs = {n: (reference_rois[n], acquisition_rois[n]) for n in names}
    for name, rois in pairs.items():
        for box, url in zip(level(level_path).boxes(rois), urls):
            if box.is_empty:
                raise RegistrationInputError(
                    f"ROI {name!r} lies outside the image {url!r}; fix the ROI "
                    "table, or choose a table whose ROIs are inside the image."
                )
    chosen = {
        n: _level_for(functools.partial(boxes_at, rois), finer)
        for n, rois in pairs.items()
    }
    moved = sorted(n for n, p in chosen.items() if p != level_path)
    if moved:
        logger.info(
            "ROI(s) %s are smaller than %d px in y or x at level %s; estimated at "
            "level(s) %s instead.",
            moved,
            MIN_ROI_PX,
            level_path,
            sorted({chosen[n] for n in moved}),
        )

    options: dict[str, Any] = {
        "lower_rescale_quantile": quantiles[0],
        "upper_rescale_quantile": quantiles[1],
    }
    unit_um = level0_pixel_um or geometry.pixel_um

    def level0_px(path: str) -> float:
        pixel_um = level(path).geometries[0].pixel_um
        return max(pixel_um[a] / unit_um[a] for a in ("y", "x"))

    def size_um(rois: tuple[Roi, Roi], path: str) -> dict[str, float]:
        pair = level(path)
        box = crop_to_common(*pair.boxes(rois))[0]
        pixel_um = pair.geometries[0].pixel_um
        return {a: n * pixel_um[a] for a, n in zip(box.axes, box.shape)}

    def reader(name: str) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
        """The ROI's pixels at a level; only the latest level read is kept."""
        last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def raw(path: str) -> tuple[np.ndarray, np.ndarray]:
            if path not in last:
                last.clear()
                last[path] = level(path).read(pairs[name])
            return last[path]

        return raw

    def measure(name: str) -> tuple[ShiftEstimate, RotationEstimate]:
        """The shift and rotation at the ROI's own level, as read."""
        pixels = reader(name)(chosen[name])
        scale = level0_px(chosen[name])
        first = estimate_shift(*pixels, method=method, level0_px=scale, **options)
        return first, estimate_rotation(*pixels, first.shift, **options)

    measured: dict[str, tuple[ShiftEstimate, RotationEstimate]] = {}
    turns: dict[str, tuple[float, str]] = {n: (0.0, "") for n in names}
    if transform == "rigid":  # the rotation first, then the shift without it
        with ThreadPoolExecutor(max(1, workers)) as pool:
            measured = dict(zip(names, pool.map(measure, names)))
        rotations = {n: r for n, (_, r) in measured.items()}
        sizes = {n: size_um(pairs[n], chosen[n]) for n in names}
        reliable = reliable_rois(rotations, sizes, unit_um)
        angles, how = rigid_angles(rotations, reliable)
        turns = {n: (angles[n], how[n]) for n in names}

    def one(name: str) -> RoiEstimate:
        raw = reader(name)
        paths = finer[finer.index(chosen[name]) :]
        turn, how = turns[name]
        measured_first, rotation = measured[name] if name in measured else measure(name)
        first: ShiftEstimate | None = measured_first
        size = size_um(pairs[name], paths[0])
        if (
            beyond_reach(turn, rotation)
            or corner_displacement(turn, size, unit_um) < MOVES_NO_PIXEL
        ):
            turn = 0.0  # left out: a copy, or a failure judge() reports
        else:
            first = None  # estimated again, without the rotation
        if transform == "translation" and rotated_whatever_the_shift(
            rotation, size, unit_um
        ):
            # A rotation blurs the match more at each finer level: reading
            # them (up to a whole camera frame) would change no verdict.
            paths = paths[:1]

        def read(path: str) -> tuple[np.ndarray, np.ndarray]:
            reference_pixels, moving = raw(path)
            return (reference_pixels, derotate(moving, turn) if turn else moving)

        estimate, path = estimate_with_retry(
            read,
            paths,
            pixels=lambda path: level(path).pixels(pairs[name]),
            level0_px=level0_px,
            first=first,
            method=method,
            **options,
        )
        if transform == "translation" and path != paths[0]:
            rotation = estimate_rotation(*raw(path), estimate.shift, **options)
        elif turn:  # what is left once the rotation is undone, measured
            left = estimate_rotation(*read(path), estimate.shift, **options)
            if left.measured:
                rotation = replace(left, angle_deg=turn + left.angle_deg)
        pair = level(path)
        box = crop_to_common(*pair.boxes(pairs[name]))[0]
        pixel_um = pair.geometries[0].pixel_um
        centre_um = {
            a: (b + n / 2) * pixel_um[a]
            for a, b, n in zip(box.axes, box.start, box.shape)
            if a in ("y", "x")
        }
        return RoiEstimate(
            estimate, path, pixel_um, rotation, centre_um, turns[name][0], how
        )

    started = time.perf_counter()
    estimates = {}
    step = max(1, len(names) // 10)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for done, (name, estimate) in enumerate(zip(names, pool.map(one, names)), 1):
            estimates[name] = estimate
            if done % step == 0 and done < len(names):
                logger.info("Estimated %d/%d ROI shifts.", done, len(names))
    elapsed = time.perf_counter() - started
    retried = sorted(n for n, e in estimates.items() if e.level_path != chosen[n])
    if retried:
        logger.info(
            "ROI(s) %s gave no reliable match, or an elongated peak, at their "
            "level; estimated at a finer level instead (level(s) %s).",
            retried,
            sorted({estimates[n].level_path for n in retried}),
        )
    logger.info(
        "Estimated %d ROI shift(s) in %.2f s (%.3f s per ROI).",
        len(names),
        elapsed,
        elapsed / max(1, len(names)),
    )
    return estimates


def judge(
    estimates: dict[str, RoiEstimate],
    pixel_um: dict[str, float],
    level0_pixel_um: dict[str, float],
    roi_size_um: dict[str, dict[str, float]],
    *,
    max_shift: float | None,
    keep_zero_if_all_failed: bool,
    zarr_url: str,
    transform: TransformModel = "translation",
    roi_centre_um: dict[str, dict[str, float]] | None = None,
) -> list[RoiRegistration]:
    """Judge every ROI's estimate; failed ROIs fall back to what the good show.

    Args:
        estimates: Per ROI name, from :func:`estimate_rois`.
        pixel_um: Pixel size of ``level_path`` per spatial axis: the unit of
            the outlier floor.
        level0_pixel_um: Pixel size of level 0, to say how far apart the good
            ROIs are, and the unit of the rotation's residual.
        roi_size_um: Extent of each ROI per axis, for the default max_shift
            and the rotation's reach.
        max_shift: Largest plausible shift in µm (None: a quarter of the ROI
            in y/x, half in z).
        keep_zero_if_all_failed: Store zeros instead of raising when no ROI is
            good.
        zarr_url: The acquisition, for messages.
        transform: The model. Under ``"translation"``, a ROI that passes but
            whose measured rotation leaves its corners beyond
            ``ROTATION_RESIDUAL`` is ``rotated`` (one warning for the image).
            Under ``"rigid"``, each ROI has the angle :func:`estimate_rois`
            chose (see :func:`rigid_angles`), and a ROI rotated beyond
            ``MAX_ROTATION_DEG`` fails.
        roi_centre_um: Centre (y, x) of each ROI in µm, the rotation's centre
            in the stored transform (default: the centre of the pixels read).

    Raises:
        RegistrationInputError: If no ROI is good and ``keep_zero_if_all_failed``
            is False.
    """
    names = list(estimates)
    axes = list(pixel_um)
    pixel = np.array([pixel_um[a] for a in axes])
    shifts_um = np.array(
        [[estimates[n].translation_um()[a] for a in axes] for n in names]
    )
    if max_shift is None:  # a quarter of the ROI in y/x, half of it in z
        share = {"z": 0.5, "y": 0.25, "x": 0.25}
        limit_um = np.array(
            [[share[a] * roi_size_um[n].get(a, np.inf) for a in axes] for n in names]
        )
    else:
        limit_um = np.full(shifts_um.shape, max_shift)
    verdicts = judge_estimates(
        [estimates[n].estimate for n in names],
        shifts_um / pixel,
        max_shift=limit_um / pixel,
        outlier_floor=OUTLIER_FLOOR_PX,
    )
    for i, name in enumerate(names):
        turn = estimates[name].turn_deg
        if verdicts[i].good and beyond_reach(turn, estimates[name].rotation):
            verdicts[i] = Verdict(
                False,
                f"rotated by {turn:.2f}°, beyond the ±{MAX_ROTATION_DEG:g}° "
                "measured reliably",
            )
    good = [i for i, v in enumerate(verdicts) if v.good]
    if not good and not keep_zero_if_all_failed:
        reasons = "; ".join(f"{n}: {v.reason}" for n, v in zip(names, verdicts))
        raise RegistrationInputError(
            f"Registration failed for every ROI of {zarr_url!r} ({reasons}). Check "
            "the wavelength_id (a channel with structure in every cycle), the "
            "rescale quantiles and max_shift; or set keep_zero_if_all_failed=True "
            "to store zero shifts."
        )
    fallback, replacement = _fallback(shifts_um[good], level0_pixel_um, axes)
    fallbacks = {name: fallback for name in names}
    moved = _well_motion(
        {names[i]: estimates[names[i]] for i in good},
        shifts_um[good],
        axes,
        level0_pixel_um,
    )
    if moved is not None:  # a rotated well: each ROI's centre moved its own way
        well, replacement = moved
        for name in names:
            fallbacks[name] = _centre_shift(well, estimates[name].centre_um, axes)
    seen = (
        _rotations_seen(
            {n: estimates[n].rotation for n in names},
            {names[i] for i in good},
            roi_size_um,
            level0_pixel_um,
        )
        if transform == "translation"
        else {}
    )
    results = []
    for i, (name, verdict) in enumerate(zip(names, verdicts)):
        shift = shifts_um[i] if verdict.good else fallbacks[name]
        status = RegistrationStatus.OK
        note = ""
        size = roi_size_um[name]
        applied = estimates[name].turn_deg
        if corner_displacement(applied, size, level0_pixel_um) < MOVES_NO_PIXEL:
            applied = 0.0
        rotation = estimates[name].rotation
        angle, source, judged = (
            (rotation.angle_deg, "", False) if transform == "rigid" else seen[name]
        )
        residual = corner_displacement(angle - applied, size, level0_pixel_um)
        rotated = judged and not ROTATION_RESIDUAL.holds(residual)
        if not verdict.good:
            status = RegistrationStatus.FALLBACK if good else RegistrationStatus.FAILED
            note = f"{verdict.reason}; shift replaced by {replacement}"
            if rotated:  # the likely cause, and what to do about it
                note += (
                    f"; the ROI is rotated by {angle:.2f}° ({source}): register "
                    'it with transform="rigid"'
                )
            logger.warning("ROI %s of %s: %s.", name, zarr_url, note)
        elif rotated:
            status = RegistrationStatus.ROTATED
            note = (
                f"rotated by {angle:.2f}° ({source}): the translation leaves "
                f"its corners up to {residual:.1f} px away; register it with "
                'transform="rigid"'
            )
        elif applied:
            note = f"rotation {applied:.3f}° ({estimates[name].turn_how})"
        elif transform == "rigid" and estimates[name].turn_how == NONE_MEASURED:
            note = "no rotation measured reliably in this image: none applied"
        centre = estimates[name].centre_um
        motion = RigidTransform(
            applied, centre, {a: float(v) for a, v in zip(axes, shift)}
        )
        if roi_centre_um is not None:
            motion = motion.about(roi_centre_um[name])
        results.append(
            RoiRegistration(
                name=name,
                transform=motion,
                roi_estimate=estimates[name],
                status=status,
                note=note,
                residual_px=residual,
            )
        )
    _warn_rotated(results, zarr_url, {n: angle for n, (angle, *_) in seen.items()})
    return results


def reliable_rois(
    rotations: dict[str, RotationEstimate],
    sizes_um: dict[str, dict[str, float]],
    pixel_um: dict[str, float],
) -> set[str]:
    """The ROIs whose angle is measured to ``MOVES_NO_PIXEL`` at their corners.

    That is, one standard deviation of the angle moves the ROI's corners by
    at most that many pixels (of ``pixel_um``).
    """
    return {n for n, r in rotations.items() if _reliable(r, sizes_um[n], pixel_um)}


def _reliable(
    rotation: RotationEstimate, size_um: dict[str, float], pixel_um: dict[str, float]
) -> bool:
    return (
        rotation.measured
        and corner_displacement(rotation.uncertainty_deg, size_um, pixel_um)
        <= MOVES_NO_PIXEL
    )


def rotated_whatever_the_shift(
    rotation: RotationEstimate, size_um: dict[str, float], pixel_um: dict[str, float]
) -> bool:
    """Whether the translation model finds this ROI ``rotated`` by its own angle.

    True when its angle is reliable and significant (see :func:`judge`) and
    moves its corners further than ``ROTATION_RESIDUAL`` allows: whatever
    shift is estimated, a translation cannot leave it aligned.
    """
    return (
        _reliable(rotation, size_um, pixel_um)
        and rotation.significant
        and not ROTATION_RESIDUAL.holds(
            corner_displacement(rotation.angle_deg, size_um, pixel_um)
        )
    )


def _rotations_seen(
    rotations: dict[str, RotationEstimate],
    good: set[str],
    sizes_um: dict[str, dict[str, float]],
    pixel_um: dict[str, float],
) -> dict[str, tuple[float, str, bool]]:
    """Under the translation model, the rotation each ROI is judged by.

    Per ROI ``(angle, how it was chosen, judged)``. Where the reliable good
    ROIs agree on one angle for the well and it is at least 3 times its
    uncertainty (that of their weighted mean), every ROI is judged by it:
    the well turned as one piece, and the mean sees a small turn that each
    ROI alone may not tell from noise. Otherwise its own angle where it is
    reliable (judged when at least 3 times its uncertainty); else, where
    reliable good ROIs measured one, the angle :func:`rigid_angles` gives
    it: a ROI whose own measurement is weak turned with the others all the
    same. Else its own angle, not judged.
    """
    reliable = reliable_rois(rotations, sizes_um, pixel_um)
    well = well_angle(rotations, reliable & good)
    if well is not None and abs(well[0]) >= 3 * well[1]:
        label = f"{_one_angle(well[2])}, ± {well[1]:.3f}°"
        return {name: (well[0], label, True) for name in rotations}
    angles, how = rigid_angles(rotations, reliable & good)
    out = {}
    for name, rotation in rotations.items():
        own = (rotation.angle_deg, f"± {rotation.uncertainty_deg:.2f}°")
        if name in reliable:
            out[name] = (*own, rotation.significant)
        elif how[name] not in (NONE_MEASURED, OWN_ANGLE):
            out[name] = (angles[name], how[name], True)
        else:  # weak, and no other ROI to tell: shown, not judged
            out[name] = (*own, False)
    return out


def beyond_reach(angle_deg: float, rotation: RotationEstimate) -> bool:
    """True for a rotation beyond ``MAX_ROTATION_DEG`` by more than 3 SD."""
    sigma = rotation.uncertainty_deg if rotation.measured else 0.0
    return abs(angle_deg) - 3 * sigma > MAX_ROTATION_DEG


NONE_MEASURED = "none measured"
OWN_ANGLE = "this ROI's own"


def rigid_angles(
    rotations: dict[str, RotationEstimate], good: set[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """The angle each ROI's rigid transform gets, and how it was chosen.

    ``good`` are the ROIs whose angle was measured reliably. When their
    angles agree (every one within ``WELL_ANGLE_AGREEMENT_DEG``, or 3
    standard deviations, of their weighted mean), the ROIs moved as one
    piece: every ROI gets that mean, which rests on all of them. Otherwise
    each good ROI keeps its own angle, and every other ROI gets the median
    of the good ones (their angle when only one); 0 when there is none.
    """
    measured = {n: r for n, r in rotations.items() if n in good and r.measured}
    if not measured:
        return {n: 0.0 for n in rotations}, {n: NONE_MEASURED for n in rotations}
    well = well_angle(rotations, good)
    if well is not None:
        label = _one_angle(well[2])
        return {n: well[0] for n in rotations}, {n: label for n in rotations}
    median = float(np.median([r.angle_deg for r in measured.values()]))
    angles, how = {}, {}
    for name in rotations:
        if name in measured:
            angles[name], how[name] = measured[name].angle_deg, OWN_ANGLE
        else:
            angles[name], how[name] = median, "the median of the good ROIs"
    return angles, how


def well_angle(
    rotations: dict[str, RotationEstimate], good: set[str]
) -> tuple[float, float, int] | None:
    """One angle for the well, where the ROIs ``good`` measured agree on it.

    Returns ``(mean, its standard deviation, ROIs)``: the mean weighted by
    each angle's inverse variance, when there are at least two and every
    one lies within ``WELL_ANGLE_AGREEMENT_DEG``, or 3 standard deviations,
    of it. None otherwise.
    """
    measured = {n: r for n, r in rotations.items() if n in good and r.measured}
    if len(measured) < 2:
        return None
    angle = np.array([r.angle_deg for r in measured.values()])
    weight = np.array([max(r.uncertainty_deg, 1e-6) ** -2 for r in measured.values()])
    mean = float(np.sum(weight * angle) / np.sum(weight))
    sigma = np.sqrt(1 / weight)
    agree = np.abs(angle - mean) <= np.maximum(WELL_ANGLE_AGREEMENT_DEG, 3 * sigma)
    if not np.all(agree):
        return None
    return mean, float(np.sqrt(1 / np.sum(weight))), len(measured)


def _one_angle(rois: int) -> str:
    return f"one angle for the well, from {rois} ROIs"


def _warn_rotated(
    results: Sequence[RoiRegistration], zarr_url: str, judged: dict[str, float]
) -> None:
    """One warning for all the ROIs of an image left ``rotated``.

    ``judged``: per ROI name, the angle it was judged by.
    """
    rotated = [r for r in results if r.status is RegistrationStatus.ROTATED]
    if not rotated:
        return
    angles = [judged[r.name] for r in rotated]
    logger.warning(
        "%d ROI(s) of %s are rotated (%.2f° to %.2f°): the translation model "
        "leaves their corners up to %.1f px away (%s). Their translations are "
        'kept; register them with transform="rigid".',
        len(rotated),
        zarr_url,
        min(angles),
        max(angles),
        max(r.residual_px for r in rotated),
        ", ".join(r.name for r in rotated),
    )


def _fallback(
    good_um: np.ndarray, level0_pixel_um: dict[str, float], axes: Sequence[str]
) -> tuple[np.ndarray, str]:
    """The shift given to a failed ROI, and how to describe it in its note.

    The median of the good ROIs is right when the well moved as one piece;
    when the good ROIs disagree by more than a level-0 pixel, the note gives
    their spread, so the user sees the fallback is a guess.
    """
    if len(good_um) == 0:
        return np.zeros(len(axes)), "zero"
    median = np.median(good_um, axis=0)
    level0 = np.array([level0_pixel_um[a] for a in axes])
    spread_px = float(np.max(np.linalg.norm((good_um - median) / level0, axis=1)))
    if spread_px <= 1.0:
        return median, "the median of the good ROIs"
    spread_um = float(np.max(np.linalg.norm(good_um - median, axis=1)))
    return median, (
        f"the median of the good ROIs, which differ from it by up to "
        f"{spread_px:.1f} px ({spread_um:.2f} µm): a guess"
    )


def _well_motion(
    good: dict[str, RoiEstimate],
    good_um: np.ndarray,
    axes: Sequence[str],
    level0_pixel_um: dict[str, float],
) -> tuple[RigidTransform, str] | None:
    """The rigid motion of the whole well, where the good ROIs show one.

    When the well turned (the median of the good ROIs' measured angles moves
    their centres apart by half a level-0 pixel or more), each ROI's centre
    moves its own way and their median fits none of them. The well's
    rotation about the good ROIs' mean centre, with the translation that
    fits their shifts best, then gives a failed ROI the shift of its own
    centre, if it fits every good ROI within a level-0 pixel. None
    otherwise (fewer than two good ROIs, no turn, or no fit): the median.
    """
    angles = [e.rotation.angle_deg for e in good.values() if e.rotation.measured]
    if len(good) < 2 or not angles or "y" not in axes or "x" not in axes:
        return None
    angle = float(np.median(angles))
    centres = np.array([[e.centre_um["y"], e.centre_um["x"]] for e in good.values()])
    middle = dict(zip(("y", "x"), centres.mean(axis=0), strict=True))
    turn = RigidTransform(angle, middle)
    level0 = np.array([level0_pixel_um[a] for a in axes])
    turned = np.array([_centre_shift(turn, e.centre_um, axes) for e in good.values()])
    if np.max(np.linalg.norm(turned / level0, axis=1)) < MOVES_NO_PIXEL:
        return None  # no turn to speak of: the median is right
    offset = np.mean(good_um - turned, axis=0)
    misfit_px = float(
        np.max(np.linalg.norm((good_um - turned - offset) / level0, axis=1))
    )
    if misfit_px > 1.0:
        return None
    well = RigidTransform(angle, middle, dict(zip(axes, map(float, offset))))
    return well, (
        f"the shift of its centre under the well's motion fitted to the good "
        f"ROIs (rotation {angle:.2f}° and a translation, within "
        f"{misfit_px:.1f} px of each)"
    )


def _centre_shift(
    motion: RigidTransform, centre_um: dict[str, float], axes: Sequence[str]
) -> np.ndarray:
    """Displacement of a ROI centre (y, x) under ``motion``, per axis of ``axes``."""
    moved = motion.about(centre_um).translation
    return np.array([moved.get(a, 0.0) for a in axes])


def roi_sizes(rois: Iterable[Roi]) -> dict[str, dict[str, float]]:
    """Extent in µm per spatial axis of each ROI, by name."""
    return {
        name: {axis: length for axis, (_, length) in slices_um(roi).items()}
        for name, roi in by_name(list(rois)).items()
    }


def quality_table(results: Sequence[RoiRegistration]) -> ConditionTable:
    """The per-ROI verdicts as a condition table indexed by ROI name."""
    frame = pd.DataFrame(
        [r.quality_row() for r in results],
        index=pd.Index([r.name for r in results], name="roi"),
        columns=list(QUALITY_COLUMNS),
    )
    return ConditionTable(frame)


def load_quality(container: OmeZarrContainer, input_roi_table: str) -> pd.DataFrame:
    """The quality table of ``input_roi_table`` (empty when there is none)."""
    name = quality_table_name(input_roi_table)
    if name not in container.list_tables():
        return pd.DataFrame(columns=list(QUALITY_COLUMNS))
    return container.get_table(name).dataframe
