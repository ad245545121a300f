"""Parallelization lists of the init tasks: which images pair with which."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.wells import (
    acquisition_of,
    group_by_well,
    open_well,
    reference_path,
    split_image_url,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WellImages:
    """The images of one well that a task received, sorted by role."""

    well_url: str
    references: list[str]
    # acquisition image URL -> the reference image URL it pairs with
    pairs: dict[str, str]


def plan_wells(zarr_urls: list[str], reference_acquisition: int) -> list[WellImages]:
    """Group images by well and pair each acquisition with its reference image.

    Raises:
        RegistrationInputError: If a well has no reference acquisition, an image
            is not in its well's metadata, or a reference image is not among
            ``zarr_urls``.
    """
    if not zarr_urls:
        raise RegistrationInputError("zarr_urls is empty: there is nothing to do.")
    plans = []
    for well_url, urls in group_by_well(zarr_urls).items():
        well = open_well(well_url)
        references, pairs = [], {}
        for url in urls:
            path = split_image_url(url)[1]
            if acquisition_of(well, well_url, path) == reference_acquisition:
                references.append(url)
                continue
            reference = reference_path(well, well_url, path, reference_acquisition)
            pairs[url] = f"{well_url}/{reference}"
        missing = sorted(set(pairs.values()) - set(references))
        if missing:
            raise RegistrationInputError(
                f"Reference image(s) {missing} of well {well_url!r} are not among "
                "the images given to the task. Include the reference acquisition "
                f"(reference_acquisition={reference_acquisition}) in the dataset."
            )
        if not references:
            reference_path(well, well_url, "", reference_acquisition)  # raises
        logger.info(
            "Well %s: %d reference image(s) %s, %d acquisition image(s).",
            well_url,
            len(references),
            references,
            len(pairs),
        )
        plans.append(WellImages(well_url, references, pairs))
    return plans
