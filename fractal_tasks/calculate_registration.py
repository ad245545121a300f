"""Compute part of "Calculate Registration (image-based)"."""

import logging
from typing import Annotated

from ngio import OmeZarrContainer, Roi
from pydantic import Field, validate_call

from fractal_tasks.hcs.cpus import available_cpus
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.images import open_image
from fractal_tasks.hcs.models import InitArgsRegistration
from fractal_tasks.hcs.roi_tables import (
    by_name,
    load_rois,
    load_rois_like,
    quality_table_name,
    roi_centre_um,
    save_rois,
    save_table,
    spatial_geometry,
    table_backend,
    with_columns,
    without_columns,
)
from fractal_tasks.registration.calculate import (
    ReferenceReads,
    RoiRegistration,
    TransformModel,
    estimate_rois,
    judge,
    quality_table,
    roi_sizes,
)
from fractal_tasks.registration.shift import RegistrationMethod

logger = logging.getLogger("calculate_registration")

Quantile = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


@validate_call
def calculate_registration(
    *,
    zarr_url: str,
    init_args: InitArgsRegistration,
    wavelength_id: str,
    reference_wavelength_id: str | None = None,
    method: RegistrationMethod = RegistrationMethod.PHASE_CROSS_CORRELATION,
    lower_rescale_quantile: Quantile = 0.0,
    upper_rescale_quantile: Quantile = 0.99,
    input_roi_table: str = "FOV_ROI_table",
    level_path: str = "2",
    max_shift: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None,
    keep_zero_if_all_failed: bool = False,
    transform: TransformModel = "translation",
) -> None:
    """Calculate, per ROI, the translation that moves an acquisition onto the reference.

    For each ROI of `input_roi_table` (paired with the reference's ROI of the
    same name), the registration channel of both images is read at
    `level_path`, rescaled between the given intensity quantiles, its smooth
    background removed, and the shift is estimated with subpixel precision
    (phase correlation with a window and a low-pass, refined around the
    peak). A ROI smaller than 32 px in y or x at `level_path` is read at
    the coarsest finer level where it is not, and a ROI whose estimate fails
    its own evidence (below) is estimated at each finer level in turn until
    one passes, and that estimate is kept; a finer level is read only while
    the ROI there is at most 2**23 px (8.4 Mpx, a whole camera frame) per
    image, so a failed whole-well ROI never reads the full-resolution well;
    under `transform="translation"` a ROI whose own rotation makes it
    `rotated` is not read finer (the rotation blurs the match more there).
    The log says so. Time series (more than one time point)
    are refused with an error.

    Each ROI then gets a verdict from the evidence of its own registration: a
    correlation peak that does not stand out of the fine band of the
    correlation surface (empty, saturated, defocused or unrelated images,
    smooth shading only), a match that slides with the image frame along
    some direction (an edge or a rim fixes the shift across it, not along
    it; a smooth gradient or vignetting, in every direction), an overlap
    more than half at the image's maximum value
    (saturated), no gain in correlation from the shift, a shift beyond
    `max_shift`, or a shift far from the other ROIs of the acquisition when
    those agree closely: the ROI failed. Its
    translation is replaced by the median of the good ROIs (status
    `fallback`; the note gives the spread of the good ROIs when they differ
    by more than a pixel) and one warning names it. In a well that turned
    (the good ROIs' angle moves their centres by half a pixel or more), it
    is replaced instead by the shift of its own centre under the well's
    rotation and translation fitted to the good ROIs, where that fits each
    of them within a level-0 pixel.

    The acquisition's `input_roi_table` gets `translation_z`,
    `translation_y`, `translation_x` per ROI (micrometres, the shift that
    moves the acquisition onto the reference: acquisition pixel `p` shows
    what reference pixel `p + translation` shows; the columns of
    fractal-tasks-core). The verdicts go to the condition table
    `<input_roi_table>_registration_quality`, one row per ROI name:
    `registration_status` (`ok`, `rotated`, `fallback` or `failed`),
    `registration_note` (why a ROI is not `ok`), `ncc_before` and
    `ncc_after` (normalized cross-correlation, -1 to 1, of the prepared
    registration channel without and with the shift), `peak_significance`
    (the correlation peak in robust standard deviations of the surface's
    fine band), `peak_elongation`, `uncertainty_px` (how far the match slides
    along the direction the content fixes least, level-0 px) and
    `uncertainty_direction_deg`, `saturated` (share of the
    overlap at the image's maximum value, 0 to 1), the `level_path` the ROI
    was estimated at,
    and the rotation: `rotation_deg` (what the stored transform applies),
    `measured_rotation_deg`, `rotation_uncertainty_deg` and `residual_px`
    (what the stored transform leaves at the ROI's corners, level-0 px).

    Args:
        zarr_url: Path or url to the individual OME-Zarr image to be processed.
            (standard argument for Fractal tasks, managed by Fractal server).
        init_args: Initialization arguments provided by
            `init_calculate_registration`: the `reference_zarr_url` of the
            reference acquisition's image in the same well, and
            `other_zarr_urls`, further images registered onto it in the same
            call (all are estimated before any table is written, and each
            reference ROI is read once).
            (standard argument for Fractal tasks, managed by Fractal server).
        wavelength_id: Channel used for registration, by wavelength id (e.g.
            `A01_C01` for Yokogawa, `C01` for MD) or by channel label (e.g.
            `DAPI`). It should show the same structures in every cycle.
        reference_wavelength_id: Channel of the reference acquisition to
            register against, by wavelength id or label, when the reference
            cycle shows the same structures on another channel. Default: the
            same as `wavelength_id`.
        method: `phase_cross_correlation` (2D and 3D, subpixel) or
            `chi2_shift` (2D only; needs the optional package
            image_registration: install `fractal-tasks[chi2]`, in Fractal
            collect the task package with pip_extras `chi2`).
        lower_rescale_quantile: Intensities below this quantile (0 to 1) of
            each ROI are clipped before registration; must be below
            `upper_rescale_quantile`.
        upper_rescale_quantile: Intensities above this quantile (0 to 1) of
            each ROI are compressed logarithmically before registration,
            which tames bright debris yet keeps the profile of bright nuclei.
        input_roi_table: ROI table to register per row, e.g. `FOV_ROI_table`
            (one translation per field of view) or `well_ROI_table` (one for
            the whole well). Must exist in both images with the same ROI names.
        level_path: Pyramid level to read, e.g. `"2"` (4x downsampled in y and
            x) or `"0"` (full resolution). The translation is subpixel at this
            level.
        max_shift: Largest plausible shift in micrometres along any axis; a
            larger one marks the ROI as failed. If unset, a quarter of the ROI's
            size in y and x, and half of it in z.
        keep_zero_if_all_failed: If every ROI of the acquisition fails, store
            zero translations (status `failed`) instead of raising an error.
        transform: `translation` (fractal-tasks-core's model) or `rigid`: a
            rotation about each ROI's centre (about z in 3D) plus a
            translation. The rotation is measured under both and reported in
            the quality table; under `translation` a ROI whose rotation
            leaves its corners more than 1 px away is `rotated` (its
            translation kept, one warning for the image). Under `rigid` the
            rotation is stored (`rotation_deg`) and applied by Consensus and
            Apply; when the ROIs' angles agree, one angle for the well is
            used, measured on all of them; rotations beyond ±5° fail.
    """
    if lower_rescale_quantile >= upper_rescale_quantile:
        raise RegistrationInputError(
            f"lower_rescale_quantile ({lower_rescale_quantile}) must be below "
            f"upper_rescale_quantile ({upper_rescale_quantile})."
        )
    reference_url = init_args.reference_zarr_url
    reference = open_image(reference_url)
    reference_rois = by_name(load_rois(reference, input_roi_table, reference_url))
    reference_reads = ReferenceReads()
    # every acquisition is estimated before any is written: bad input in one
    # leaves all of them as they were
    registered = []
    for url in dict.fromkeys([zarr_url, *init_args.other_zarr_urls]):
        logger.info(
            "Registering %s onto %s per ROI of %s, channel %s, level %s, method %s.",
            url,
            reference_url,
            input_roi_table,
            wavelength_id,
            level_path,
            method.value,
        )
        acquisition = open_image(url)
        acquisition_rois = load_rois_like(
            reference_rois, acquisition, input_roi_table, reference_url, url
        )
        level0_pixel_um, _ = spatial_geometry(acquisition.get_image())
        estimates = estimate_rois(
            reference,
            acquisition,
            reference_rois,
            acquisition_rois,
            urls=(reference_url, url),
            channels=(reference_wavelength_id or wavelength_id, wavelength_id),
            level_path=level_path,
            method=method,
            quantiles=(lower_rescale_quantile, upper_rescale_quantile),
            workers=available_cpus(),
            transform=transform,
            level0_pixel_um=level0_pixel_um,
            reference_reads=reference_reads,
        )
        pixel_um, _ = spatial_geometry(acquisition.get_image(path=level_path))
        results = judge(
            estimates,
            pixel_um,
            level0_pixel_um,
            roi_sizes(reference_rois.values()),
            max_shift=max_shift,
            keep_zero_if_all_failed=keep_zero_if_all_failed,
            zarr_url=url,
            transform=transform,
            roi_centre_um={n: roi_centre_um(r) for n, r in acquisition_rois.items()},
        )
        _log_results(results)
        registered.append((url, acquisition, acquisition_rois, results))
    for url, acquisition, acquisition_rois, results in registered:
        _store(url, acquisition, acquisition_rois, results, input_roi_table)


def _log_results(results: list[RoiRegistration]) -> None:
    for result in results:
        t = result.translation_um
        logger.info(
            "ROI %s: translation (z, y, x) = (%.3f, %.3f, %.3f) µm, rotation "
            "%.3f° (measured %.3f°), NCC %.3f -> %.3f, peak %.1f, uncertainty "
            "%.2f px along %.0f°, %s.",
            result.name,
            t.get("z", 0.0),
            t["y"],
            t["x"],
            result.transform.rotation_deg,
            result.roi_estimate.rotation.angle_deg,
            result.roi_estimate.estimate.ncc_before,
            result.roi_estimate.estimate.ncc_after,
            result.roi_estimate.estimate.peak_significance,
            result.roi_estimate.estimate.uncertainty_px,
            result.roi_estimate.estimate.uncertainty_direction_deg,
            result.status.value,
        )


def _store(
    zarr_url: str,
    acquisition: OmeZarrContainer,
    acquisition_rois: dict[str, Roi],
    results: list[RoiRegistration],
    input_roi_table: str,
) -> None:
    """Write the translations into the ROI table and the verdicts beside it."""
    backend = table_backend(acquisition, input_roi_table)
    # the verdicts live in their own table; earlier versions of this package wrote
    # them as registration_* columns of the ROI table, which ngio warns about
    updated = [
        with_columns(
            without_columns(acquisition_rois[r.name], "registration_"),
            r.translation_columns(),
        )
        for r in results
    ]
    save_rois(acquisition, zarr_url, input_roi_table, updated, backend)
    save_table(
        acquisition,
        zarr_url,
        quality_table_name(input_roi_table),
        quality_table(results),
        backend,
    )
    counts = {
        s: sum(r.status.value == s for r in results)
        for s in ("ok", "rotated", "fallback", "failed")
    }
    logger.info(
        "Stored translations in %s of %s: %s.", input_roi_table, zarr_url, counts
    )


if __name__ == "__main__":
    from fractal_tasks.executable import run_as_executable

    run_as_executable(calculate_registration)
