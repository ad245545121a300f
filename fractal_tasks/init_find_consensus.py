"""Init of "Find Registration Consensus": one item per well."""

import logging
from typing import Any

from pydantic import validate_call

from fractal_tasks.hcs.plan import plan_wells

logger = logging.getLogger("init_find_consensus")


@validate_call
def init_find_consensus(
    *,
    zarr_urls: list[str],
    zarr_dir: str,
    reference_acquisition: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """List, per well, every image of the well with the reference image first.

    When a well holds several images of the reference acquisition (e.g. `0`
    and `0_illum_corr`), each forms its own group with the acquisition images
    of the same suffix.

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
        The parallelization list: one item per reference image, with
        `init_args.zarr_url_list` (the reference first, then its acquisitions).
    """
    items = []
    for plan in plan_wells(zarr_urls, reference_acquisition):
        for reference in plan.references:
            members = [url for url, ref in plan.pairs.items() if ref == reference]
            items.append(
                {
                    "zarr_url": reference,
                    "init_args": {"zarr_url_list": [reference, *members]},
                }
            )
    logger.info("%d consensus group(s) to compute.", len(items))
    return {"parallelization_list": items}


if __name__ == "__main__":
    from fractal_tasks.executable import run_as_executable

    run_as_executable(init_find_consensus)
