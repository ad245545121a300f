"""Compute part of "Find Registration Consensus"."""

import logging

from pydantic import validate_call

from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.images import open_image
from fractal_tasks.hcs.models import InitArgsRegistrationConsensus
from fractal_tasks.hcs.roi_tables import (
    by_name,
    load_rois,
    require_same_names,
    save_rois,
    save_table,
    spatial_geometry,
    table_backend,
    transform_table,
    transform_table_name,
)
from fractal_tasks.registration.consensus import registered_rois, stored_motions

logger = logging.getLogger("find_consensus")


@validate_call
def find_consensus(
    *,
    zarr_url: str,
    init_args: InitArgsRegistrationConsensus,
    input_roi_table: str = "FOV_ROI_table",
    registered_roi_table: str = "{input_roi_table}_registered",
) -> None:
    """Write, per ROI name, the region visible in every acquisition of the well.

    For each ROI name of `input_roi_table`, the ROI of every acquisition is
    moved by its transform onto the reference: by its translation (in whole
    level-0 pixels), or rotated and translated where Calculate's
    `transform="rigid"` stored a rotation. The consensus is the largest box
    in whole level-0 pixels inside all of them (for translations: their
    intersection). Each image of the well gets `registered_roi_table`: for
    each ROI, the consensus window placed at that image's own position (the
    same size in every image, an exact multiple of the pixel size), the
    input table's other columns kept; and, where some ROI of the well is
    rotated, `<registered_roi_table>_transform`, the transform of each ROI
    (rotation in degrees about the ROI's centre, centre and translation in
    µm), which Apply executes.

    Args:
        zarr_url: Path or url to the individual OME-Zarr image to be processed.
            This is the reference acquisition's image of the well.
            (standard argument for Fractal tasks, managed by Fractal server).
        init_args: Initialization arguments provided by `init_find_consensus`:
            `zarr_url_list`, every image of the well, the reference first.
            (standard argument for Fractal tasks, managed by Fractal server).
        input_roi_table: ROI table that "Calculate Registration (image-based)"
            wrote the translations into.
        registered_roi_table: Name of the table to write. May contain the
            placeholder `{input_roi_table}`. Must differ from `input_roi_table`,
            whose translations it is computed from.
    """
    registered_roi_table = registered_roi_table.replace(
        "{input_roi_table}", input_roi_table
    )
    if registered_roi_table == input_roi_table:
        raise RegistrationInputError(
            f"registered_roi_table ({registered_roi_table!r}) must differ from "
            f"input_roi_table ({input_roi_table!r}): writing over the input would "
            "destroy its translations. Use e.g. '{input_roi_table}_registered'."
        )
    urls = [zarr_url, *[u for u in init_args.zarr_url_list if u != zarr_url]]
    logger.info(
        "Consensus of %s over %d image(s) of the well of %s -> %s.",
        input_roi_table,
        len(urls),
        zarr_url,
        registered_roi_table,
    )
    containers = {url: open_image(url) for url in urls}
    rois = {
        url: by_name(load_rois(container, input_roi_table, url))
        for url, container in containers.items()
    }
    require_same_names(
        {url: set(by_roi) for url, by_roi in rois.items()}, input_roi_table, zarr_url
    )
    geometries = {
        url: spatial_geometry(container.get_image())
        for url, container in containers.items()
    }
    backends = {url: table_backend(c, input_roi_table) for url, c in containers.items()}
    motions = stored_motions(containers, rois, zarr_url, input_roi_table)
    registered = registered_rois(rois, geometries, zarr_url, input_roi_table, motions)
    # what Apply executes where a window is rotated; translations need no
    # table (the windows say them), and a stale one must not stay behind
    rotates = any(not m.is_translation for by in motions.values() for m in by.values())
    transforms = transform_table_name(registered_roi_table)
    for url, container in containers.items():
        save_rois(container, url, registered_roi_table, registered[url], backends[url])
        if rotates:
            table = transform_table(motions[url])
            save_table(container, url, transforms, table, backends[url])
        elif transforms in container.list_tables():
            container.delete_table(transforms)
    logger.info(
        "Wrote %s (%d ROI(s)) into %d image(s).",
        registered_roi_table,
        len(rois[zarr_url]),
        len(urls),
    )


if __name__ == "__main__":
    from fractal_tasks.executable import run_as_executable

    run_as_executable(find_consensus)
