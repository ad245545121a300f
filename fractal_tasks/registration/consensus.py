"""Registered ROI tables: per ROI name, the window every acquisition shows.

Geometry is done in integer level-0 pixels (``geometry``) and converted back
to micrometres once, so every acquisition's window has exactly the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ngio import OmeZarrContainer, Roi

from fractal_tasks.geometry import (
    Box,
    ImageGeometry,
    RigidTransform,
    box_slices_um,
    consensus_windows,
    roi_box,
    same_pixel_size,
)
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.roi_tables import (
    motion_in_pixels,
    slices_um,
    stored_transforms,
)

logger = logging.getLogger(__name__)


def stored_motions(
    containers: Mapping[str, OmeZarrContainer],
    rois: Mapping[str, Mapping[str, Roi]],
    reference_url: str,
    table: str,
) -> dict[str, dict[str, RigidTransform]]:
    """The transform (µm) per image and ROI name; the reference's is identity.

    Raises:
        RegistrationInputError: If no acquisition has translations (consensus
            before calculate), or some ROIs lack them.
    """
    out: dict[str, dict[str, RigidTransform]] = {}
    lacking = []
    for url, by_roi in rois.items():
        if url == reference_url:
            out[url] = {name: RigidTransform() for name in by_roi}
            continue
        stored = stored_transforms(containers[url], by_roi, url, table)
        if stored is None:
            lacking.append(url)
            continue
        out[url] = stored
    if lacking and len(lacking) == len(rois) - 1:
        raise RegistrationInputError(
            f"No translations in ROI table {table!r} of any acquisition "
            f"({lacking}). Run 'Calculate Registration (image-based)' with "
            f"input_roi_table={table!r} before 'Find Registration Consensus'."
        )
    if lacking:
        raise RegistrationInputError(
            f"ROI table {table!r} has no translations in {lacking}. Re-run "
            "'Calculate Registration (image-based)' on these acquisitions."
        )
    return out


def registered_rois(
    rois: Mapping[str, Mapping[str, Roi]],
    geometries: Mapping[str, ImageGeometry],
    reference_url: str,
    table: str,
    motions: Mapping[str, Mapping[str, RigidTransform]],
) -> dict[str, list[Roi]]:
    """Registered ROIs of every image: the consensus window, placed per image.

    The reference's window is the largest box, in whole level-0 pixels, that
    lies inside every acquisition's ROI once moved onto the reference (for
    translations: the boxes' common part). Each acquisition's window has
    the same shape, placed where its transform takes the window's centre
    from (for a translation: the reference's window shifted back).

    Args:
        rois: ``image URL -> ROI name -> ROI`` of the input table, the same
            names in every image.
        geometries: ``image URL -> pixel size and shape`` at level 0.
        reference_url: The reference image (translation zero).
        table: Input table name, for messages.
        motions: ``image URL -> ROI name -> transform`` in µm, from
            :func:`stored_motions`.

    Returns:
        ``image URL -> ROIs`` with the window in µm (exact multiples of the
        pixel size) and the input ROI's other columns kept.

    Raises:
        RegistrationInputError: If pixel sizes differ between images, or a
            ROI's consensus window is empty.
    """
    pixel_um = geometries[reference_url].pixel_um
    for url, geometry in geometries.items():
        if not same_pixel_size(geometry.pixel_um, pixel_um):
            raise RegistrationInputError(
                f"Pixel sizes differ: {url!r} has {geometry.pixel_um} µm, the "
                f"reference {reference_url!r} has {pixel_um} µm. Registration only "
                "shifts images; resample the acquisitions to the reference's pixel "
                "size."
            )
    out: dict[str, list[Roi]] = {url: [] for url in rois}
    for name in rois[reference_url]:
        boxes: dict[str, Box] = {}
        for url, by_roi in rois.items():
            box = roi_box(slices_um(by_roi[name]), pixel_um, geometries[url].shape)
            if box.is_empty:
                raise RegistrationInputError(
                    f"ROI {name!r} of table {table!r} lies outside the image "
                    f"{url!r}. Fix the ROI table."
                )
            boxes[url] = box
        moves = {
            u: motion_in_pixels(motions[u][name], pixel_um, f"ROI {name!r} of {u!r}")
            for u in rois
        }
        windows = consensus_windows(boxes, moves)
        if windows[reference_url].is_empty:
            shown = {
                u: {
                    "translation_px": {
                        a: round(v, 2) for a, v in m.translation.items()
                    },
                    "rotation_deg": round(m.rotation_deg, 3),
                }
                for u, m in moves.items()
            }
            raise RegistrationInputError(
                f"ROI {name!r}: no region is visible in every acquisition (the "
                f"window would be {windows[reference_url].shape} px). Translation "
                f"(px) and rotation per image: {shown}. One of them is probably "
                "wrong: check its registration_status, or exclude that "
                "acquisition."
            )
        for url, window in windows.items():
            out[url].append(_with_window(rois[url][name], window, pixel_um))
        logger.info(
            "ROI %s: consensus window %s px (from %s px).",
            name,
            windows[reference_url].shape,
            boxes[reference_url].shape,
        )
    return out


def _with_window(roi: Roi, window: Box, pixel_um: Mapping[str, float]) -> Roi:
    """A copy of ``roi`` whose spatial slices are ``window``."""
    slices = {
        s.axis_name: (s.start, s.length)
        for s in roi.slices
        if s.axis_name not in window.axes
    }
    slices.update(box_slices_um(window, pixel_um))
    return Roi.from_values(
        slices=slices,
        name=roi.name,
        label=roi.label,
        space=roi.space,
        **(roi.model_extra or {}),
    )
