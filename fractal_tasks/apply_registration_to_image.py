"""Parallel task "Apply Registration to Image"."""

import logging
from typing import Any

from pydantic import validate_call

from fractal_tasks.hcs.cpus import available_cpus
from fractal_tasks.writer.apply import commit, plan_apply, write_registered

logger = logging.getLogger("apply_registration_to_image")


@validate_call
def apply_registration_to_image(
    *,
    zarr_url: str,
    registered_roi_table: str,
    reference_acquisition: int = 0,
    register_labels: bool = True,
    overwrite_input: bool = True,
) -> dict[str, Any]:
    """Shift an acquisition onto its reference, keeping only the region all cycles show.

    For each ROI of `registered_roi_table`, the acquisition's window is copied
    to the reference's window of the same ROI name; pixels outside every window
    are zero. Every label image the image's `labels` group lists is registered
    the same way, whatever wrote it. The pyramid is rebuilt on the input's own
    levels (a label's on its own, which may have more or fewer levels than the
    image): 2x2 mean for intensities, nearest (first pixel) for labels, whose
    values are preserved exactly. ROI tables are copied from the reference
    (the image is now in its frame); other tables from the acquisition
    unchanged: feature and condition tables as they are, and any other table
    with a warning (coordinates in it do not follow the registration).
    Everything else in the image's folder (metadata such as `omero` and the
    coordinate transformations, chunks, shards and codecs of every array,
    groups the task does not know) is carried over byte for byte; consolidated
    metadata is refreshed where it existed.

    The input is only read; the new image is built next to it and put in place
    only once complete: a killed or failed run leaves the input as it was. With
    `overwrite_input=False`, `<image>_registered` is added to the well metadata
    (once, under ngio's lock); an existing `<image>_registered` that this task
    did not write is never replaced (the task fails instead).

    Args:
        zarr_url: Path or url to the individual OME-Zarr image to be processed.
            (standard argument for Fractal tasks, managed by Fractal server).
        registered_roi_table: ROI table written by "Find Registration
            Consensus", e.g. `FOV_ROI_table_registered` (per field of view) or
            `well_ROI_table_registered` (whole well).
        reference_acquisition: Acquisition id (from the well metadata) of the
            reference the images were registered onto.
        register_labels: Also register every label image of the acquisition.
            If False, the labels are not written into the registered image; as
            they would then be lost, the task refuses to run with
            `overwrite_input=True` on an image that has labels.
        overwrite_input: Replace the input image by the registered one. If
            False, write `<image>_registered` next to it instead.

    Returns:
        `image_list_updates` for Fractal: the input URL when it is replaced,
        else the new image's URL with `origin` set to the input.
    """
    logger.info(
        "Applying %s to %s (reference acquisition %d, labels %s, overwrite %s).",
        registered_roi_table,
        zarr_url,
        reference_acquisition,
        register_labels,
        overwrite_input,
    )
    plan = plan_apply(
        zarr_url,
        registered_roi_table=registered_roi_table,
        reference_acquisition=reference_acquisition,
        register_labels=register_labels,
        overwrite_input=overwrite_input,
    )
    logger.info(
        "Reference image %s; %d ROI window(s); label(s) registered: %s.",
        plan.reference_url,
        len(plan.multiscales[0].pairs),
        plan.labels,
    )
    write_registered(plan, workers=available_cpus())
    return commit(plan)


if __name__ == "__main__":
    from fractal_tasks.executable import run_as_executable
    from fractal_tasks.writer.memory import return_freed_memory

    # Process-wide allocator tuning: only here, where the process is the task's
    # own (Fractal starts one per image), never when the function is called.
    return_freed_memory()
    run_as_executable(apply_registration_to_image)
