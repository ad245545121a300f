"""Per-ROI translation between an acquisition and its reference, with a verdict.

Reads only the registration channel, at the chosen pyramid level, ROI by ROI
(in parallel threads), estimates each ROI's shift, judges it, and replaces the
shift of a failed ROI by the median of the good ROIs of the same acquisition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ngio import OmeZarrContainer

from fractal_tasks._errors import RegistrationInputError
from fractal_tasks._geometry import Box, crop_to_common, roi_box
from fractal_tasks._roi_tables import by_name, slices_um, spatial_geometry
from fractal_tasks._shift import (
    RegistrationMethod,
    RegistrationStatus,
    ShiftEstimate,
    estimate_shift,
    judge_estimates,
)

logger = logging.getLogger(__name__)

STATUS_COLUMN = "registration_status"
NCC_BEFORE_COLUMN = "registration_ncc_before"
NCC_AFTER_COLUMN = "registration_ncc_after"
NOTE_COLUMN = "registration_note"


@dataclass(frozen=True)
class RoiRegistration:
    """Outcome for one ROI: translation in µm per spatial axis, and its quality."""

    name: str
    translation_um: dict[str, float]
    ncc_before: float
    ncc_after: float
    status: RegistrationStatus
    note: str

    def columns(self) -> dict[str, object]:
        """The ROI-table columns this outcome writes."""
        return {
            "translation_z": self.translation_um.get("z", 0.0),
            "translation_y": self.translation_um["y"],
            "translation_x": self.translation_um["x"],
            NCC_BEFORE_COLUMN: self.ncc_before,
            NCC_AFTER_COLUMN: self.ncc_after,
            STATUS_COLUMN: self.status.value,
            NOTE_COLUMN: self.note,
        }


def channel_index(image, identifier: str, zarr_url: str) -> int:
    """Index of the channel with this wavelength id, or else this label.

    Raises:
        RegistrationInputError: If no channel has that wavelength id or label.
    """
    try:
        return image.get_channel_idx(wavelength_id=identifier)
    except Exception:
        pass
    try:
        return image.get_channel_idx(channel_label=identifier)
    except Exception:
        pass
    meta = image.channels_meta if hasattr(image, "channels_meta") else None
    known = [(c.wavelength_id, c.label) for c in meta.channels] if meta else []
    raise RegistrationInputError(
        f"No channel with wavelength id or label {identifier!r} in {zarr_url!r} "
        f"(channels as (wavelength_id, label): {known}). Set wavelength_id to one "
        "of them."
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


def channel_reader(image, channel: int, zarr_url: str):
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
        index = []
        for axis in axes:
            if axis == "c":
                index.append(channel)
            elif axis == "t":
                index.append(0)
            else:
                index.append(spatial[axis])
        return np.asarray(array[tuple(index)])

    return read


def estimate_rois(
    reference: OmeZarrContainer,
    acquisition: OmeZarrContainer,
    reference_rois: dict,
    acquisition_rois: dict,
    *,
    urls: tuple[str, str],
    wavelength_id: str,
    level_path: str,
    method: RegistrationMethod,
    quantiles: tuple[float, float],
    workers: int,
) -> tuple[dict[str, ShiftEstimate], dict[str, float]]:
    """Estimate the shift of every ROI, in pixels of ``level_path``.

    Returns:
        The estimate per ROI name and the pixel size in µm per spatial axis of
        that level.
    """
    images = [
        level_image(container, level_path, url)
        for container, url in zip((reference, acquisition), urls)
    ]
    readers = [
        channel_reader(image, channel_index(image, wavelength_id, url), url)
        for image, url in zip(images, urls)
    ]
    geometries = [spatial_geometry(image) for image in images]
    if geometries[0][0] != geometries[1][0]:
        raise RegistrationInputError(
            f"Pixel sizes differ at level {level_path}: reference {geometries[0][0]}"
            f" µm, acquisition {geometries[1][0]} µm. Registration only shifts "
            "images; resample the acquisitions to the reference's pixel size first."
        )
    if method is RegistrationMethod.CHI2_SHIFT and geometries[0][1].get("z", 1) > 1:
        raise RegistrationInputError(
            f"method='chi2_shift' works on 2D images, but {urls[1]!r} has "
            f"{geometries[0][1]['z']} z planes. Use 'phase_cross_correlation'."
        )

    def one(name: str) -> ShiftEstimate:
        boxes = [
            roi_box(slices_um(rois[name]), *geometry)
            for rois, geometry in zip((reference_rois, acquisition_rois), geometries)
        ]
        for box, url in zip(boxes, urls):
            if box.is_empty:
                raise RegistrationInputError(
                    f"ROI {name!r} lies outside the image {url!r}; fix the ROI "
                    "table, or choose a table whose ROIs are inside the image."
                )
        boxes = crop_to_common(*boxes)
        ref_pixels, acq_pixels = (read(b) for read, b in zip(readers, boxes))
        return estimate_shift(
            ref_pixels,
            acq_pixels,
            method=method,
            lower_rescale_quantile=quantiles[0],
            upper_rescale_quantile=quantiles[1],
        )

    names = list(reference_rois)
    started = time.perf_counter()
    estimates = {}
    step = max(1, len(names) // 10)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for done, (name, estimate) in enumerate(zip(names, pool.map(one, names)), 1):
            estimates[name] = estimate
            if done % step == 0 and done < len(names):
                logger.info("Estimated %d/%d ROI shifts.", done, len(names))
    elapsed = time.perf_counter() - started
    logger.info(
        "Estimated %d ROI shift(s) at level %s in %.2f s (%.3f s per ROI).",
        len(names),
        level_path,
        elapsed,
        elapsed / max(1, len(names)),
    )
    return estimates, geometries[0][0]


def judge(
    estimates: dict[str, ShiftEstimate],
    pixel_um: dict[str, float],
    roi_size_um: dict[str, dict[str, float]],
    *,
    max_shift: float | None,
    keep_zero_if_all_failed: bool,
    zarr_url: str,
) -> list[RoiRegistration]:
    """Judge every ROI's estimate; failed ROIs fall back to the median of the good.

    Raises:
        RegistrationInputError: If no ROI is good and ``keep_zero_if_all_failed``
            is False.
    """
    names = list(estimates)
    axes = list(pixel_um)
    shifts_px = np.array([estimates[n].shift[-len(axes) :] for n in names], float)
    if max_shift is None:  # a quarter of the ROI in y/x, half of it in z
        share = {"z": 0.5, "y": 0.25, "x": 0.25}
        limit = np.array(
            [
                [share[a] * roi_size_um[n].get(a, np.inf) / pixel_um[a] for a in axes]
                for n in names
            ]
        )
    else:
        limit = np.full(shifts_px.shape, max_shift) / np.array(
            [pixel_um[a] for a in axes]
        )
    verdicts = judge_estimates(
        shifts_px,
        np.array([estimates[n].ncc_before for n in names]),
        np.array([estimates[n].ncc_after for n in names]),
        np.array([estimates[n].signal for n in names]),
        max_shift_px=limit,
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
    fallback = np.median(shifts_px[good], axis=0) if good else np.zeros(len(axes))
    results = []
    for i, (name, verdict) in enumerate(zip(names, verdicts)):
        shift = shifts_px[i] if verdict.good else fallback
        status = RegistrationStatus.OK
        note = ""
        if not verdict.good:
            status = RegistrationStatus.FALLBACK if good else RegistrationStatus.FAILED
            replacement = "the median of the good ROIs" if good else "zero"
            note = f"{verdict.reason}; shift replaced by {replacement}"
            logger.warning("ROI %s of %s: %s.", name, zarr_url, note)
        results.append(
            RoiRegistration(
                name=name,
                translation_um={a: float(s) * pixel_um[a] for a, s in zip(axes, shift)},
                ncc_before=float(estimates[name].ncc_before),
                ncc_after=float(estimates[name].ncc_after),
                status=status,
                note=note,
            )
        )
    return results


def roi_sizes(rois: Sequence) -> dict[str, dict[str, float]]:
    """Extent in µm per spatial axis of each ROI, by name."""
    return {
        name: {axis: length for axis, (_, length) in slices_um(roi).items()}
        for name, roi in by_name(list(rois)).items()
    }
