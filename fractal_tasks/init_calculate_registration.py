"""Init of "Calculate Registration (image-based)": pair images with their reference."""

import logging
from typing import Any

from pydantic import validate_call

from fractal_tasks.hcs.plan import plan_wells

logger = logging.getLogger("init_calculate_registration")


@validate_call
def init_calculate_registration(
    *,
    zarr_urls: list[str],
    zarr_dir: str,
    reference_acquisition: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Pair every acquisition image with the reference acquisition's image of its well.

    Images are grouped by well; in each well, the reference is the image whose
    acquisition id (from the well metadata) is `reference_acquisition`. When a
    well holds several images of one acquisition (e.g. `0` and `0_illum_corr`),
    each pairs with the reference image of the same suffix. Reference images
    themselves are not listed: their translation is zero by definition.
    All the images that pair with one reference form one item, registered
    in one process that reads the reference once: a task process costs
    about 2 s of start-up, paid once per well instead of once per cycle.

    Args:
        zarr_urls: List of paths or urls to the individual OME-Zarr image to
            be processed.
            (standard argument for Fractal tasks, managed by Fractal server).
        zarr_dir: path of the directory where the new OME-Zarrs will be
            created. Not used by this task.
            (standard argument for Fractal tasks, managed by Fractal server).
        reference_acquisition: Acquisition id (from the well metadata) that every
            other acquisition is registered onto. Every well must have it.

    Returns:
        The parallelization list: one item per reference image, for the
        first image that pairs with it, with `init_args.reference_zarr_url`
        and the others in `init_args.other_zarr_urls`.
    """
    plans = plan_wells(zarr_urls, reference_acquisition)
    groups: dict[str, list[str]] = {}
    for plan in plans:
        for url, reference in plan.pairs.items():
            groups.setdefault(reference, []).append(url)
    items = [
        {
            "zarr_url": urls[0],
            "init_args": {"reference_zarr_url": reference, "other_zarr_urls": urls[1:]},
        }
        for reference, urls in groups.items()
    ]
    logger.info(
        "%d image(s) to register in %d well(s), one task per reference image.",
        sum(map(len, groups.values())),
        len(plans),
    )
    return {"parallelization_list": items}


if __name__ == "__main__":
    from fractal_tasks.executable import run_as_executable

    run_as_executable(init_calculate_registration)
