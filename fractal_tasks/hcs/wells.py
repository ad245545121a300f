"""HCS plate helpers: images grouped by well, and each image's reference image."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from pathlib import Path

import zarr
from ngio import OmeZarrWell, open_ome_zarr_well
from ngio.utils import NgioUserWarning, NgioValueError

from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError

logger = logging.getLogger(__name__)

NON_ALPHANUMERIC_PATH_WARNING = r"Path '.*' contains non-alphanumeric characters"
"""ngio's warning for an image path such as ``1_registered`` in a well."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def require_local(zarr_url: str) -> None:
    """Refuse a URL with a scheme (``s3://``, ``gs://``, ``https://``, ``file://``).

    The tasks read and write an image's files directly and Apply replaces
    directories by renaming them, which object stores cannot do. A ``file://``
    URL is refused too rather than rewritten: Fractal's image list knows the
    image by the URL it gave, which the task must return unchanged.

    Raises:
        RegistrationInputError: For any URL with a scheme, naming what works.
    """
    scheme = _SCHEME.match(zarr_url)
    if scheme is None:
        return
    if scheme.group(1).lower() == "file":
        fix = f"Give the path itself, {zarr_url[len(scheme.group(0)) :]!r}."
    else:
        fix = "Copy or mount the plate there and give its path."
    raise RegistrationInputError(
        f"{zarr_url!r} is not a file-system path ({scheme.group(0)}): these tasks "
        "work only on plates in a local or mounted POSIX file system (e.g. NFS, "
        "GPFS, Lustre, CephFS), given as a path such as "
        f"'/data/plate.zarr/B/03/0'. {fix}"
    )


def split_image_url(zarr_url: str) -> tuple[str, str]:
    """Split ``<plate>/<row>/<column>/<image>`` into the well URL and the image path.

    Raises:
        RegistrationInputError: If the URL has a scheme (see
            :func:`require_local`), or too few parts to be an image of an HCS
            plate.
    """
    require_local(zarr_url)
    parts = zarr_url.rstrip("/").split("/")
    if len(parts) < 4 or not all(parts[-3:]):
        raise RegistrationInputError(
            f"{zarr_url!r} is not an image inside an HCS well: expected "
            "'<plate>.zarr/<row>/<column>/<image>'. Pass the URL of an image of "
            "an OME-Zarr HCS plate."
        )
    return "/".join(parts[:-1]), parts[-1]


WELL_READ_PAUSES_S = (0.01, 0.05, 0.2, 0.5)
"""Pauses (seconds) between reads of well metadata that is missing or malformed.

Other runs add their images to the well meanwhile: zarr writes the metadata
file beside itself and renames it over the old one. Some file systems do that
rename in two steps when another process has the old file open (FUSE mounts
hide it first, as an NFS client may "silly-rename" it), so the file is briefly
missing. Under a second in all; metadata that stays bad is reported after the
last read.
"""


def open_well(well_url: str) -> OmeZarrWell:
    """Open the well of an HCS plate, with errors that say what is wrong.

    Raises:
        RegistrationInputError: If the folder does not exist or holds no valid
            well metadata.
    """
    if not Path(well_url).is_dir():
        raise RegistrationInputError(
            f"Well {well_url!r} does not exist. Check the zarr_url: it must point "
            "to an image inside an existing OME-Zarr HCS plate."
        )
    for pause_s in WELL_READ_PAUSES_S:
        with contextlib.suppress(*_UNREADABLE_WELL):
            return _read_well(well_url)
        time.sleep(pause_s)
    try:
        return _read_well(well_url)
    except _UNREADABLE_WELL as error:
        raise RegistrationInputError(
            f"{well_url!r} has no valid OME-Zarr well metadata ({error}). The "
            "images must live in an HCS plate (plate/row/column/image); repair or "
            "re-create the well's .zattrs/zarr.json, e.g. by re-running the "
            "converter."
        ) from error


_UNREADABLE_WELL = (*MISSING_OR_MALFORMED, zarr.errors.GroupNotFoundError)


def _read_well(well_url: str) -> OmeZarrWell:
    # cached: later reads through this object would meet the same moments
    well = open_ome_zarr_well(well_url, cache=True)
    well.paths()  # decodes the metadata, which opening alone does not
    return well


def group_by_well(zarr_urls: list[str]) -> dict[str, list[str]]:
    """Group image URLs by their well URL, keeping the input order."""
    wells: dict[str, list[str]] = {}
    for url in zarr_urls:
        well_url, _ = split_image_url(url)
        wells.setdefault(well_url, []).append(url.rstrip("/"))
    return wells


def acquisition_of(well: OmeZarrWell, well_url: str, image_path: str) -> int:
    """Acquisition id of one image of a well, from the well metadata.

    Raises:
        RegistrationInputError: If the image is not listed in the well metadata.
    """
    if image_path not in well.paths():
        raise RegistrationInputError(
            f"Image {image_path!r} is not listed in the metadata of well "
            f"{well_url!r} (it lists {well.paths()}). Only images of the well's "
            "metadata can be registered."
        )
    acquisition = well.get_image_acquisition_id(image_path)
    if acquisition is None:
        raise RegistrationInputError(
            f"Image {image_path!r} of well {well_url!r} has no acquisition id in "
            "the well metadata; registration pairs images by acquisition."
        )
    return acquisition


def _suffix(image_path: str) -> str:
    """What follows the first underscore of an image path (``0_illum`` -> ``illum``)."""
    return image_path.split("_", 1)[1] if "_" in image_path else ""


def reference_path(
    well: OmeZarrWell, well_url: str, image_path: str, reference_acquisition: int
) -> str:
    """Path of the reference acquisition's image that ``image_path`` pairs with.

    When the well holds several images of the reference acquisition (for example
    ``0`` and ``0_illum_corr``), the one with the same suffix as ``image_path``
    is chosen, else the one without suffix; the choice is logged.

    Raises:
        RegistrationInputError: If the well has no image of the reference
            acquisition, or several candidates and none matches.
    """
    candidates = well.paths(acquisition=reference_acquisition)
    if not candidates:
        raise RegistrationInputError(
            f"Well {well_url!r} has no image of reference_acquisition="
            f"{reference_acquisition} (its acquisitions are "
            f"{sorted(well.acquisition_ids)}). Set reference_acquisition to one of "
            "them, or add the missing cycle to the well."
        )
    if len(candidates) == 1:
        return candidates[0]
    if image_path in candidates:
        return image_path
    by_suffix = {_suffix(path): path for path in candidates}
    chosen = by_suffix.get(_suffix(image_path), by_suffix.get(""))
    if chosen is None:
        raise RegistrationInputError(
            f"Well {well_url!r} has several images of reference_acquisition="
            f"{reference_acquisition} ({candidates}) and none matches image "
            f"{image_path!r} by suffix. Rename the images so that each has a "
            "reference of the same suffix, or keep one reference image."
        )
    logger.info(
        "Well %s has %d reference images %s; image %r pairs with %r (same suffix).",
        well_url,
        len(candidates),
        candidates,
        image_path,
        chosen,
    )
    return chosen


def add_image_to_well(well_url: str, image_path: str, acquisition: int) -> bool:
    """List ``image_path`` in the well metadata once, under ngio's file lock.

    Safe against concurrent additions from other processes. Returns False when
    the image was listed already (a re-run), True when it was added.
    """
    if image_path in open_well(well_url).paths():
        return False
    with warnings.catch_warnings():
        # '<image>_registered' is the name fractal-tasks-core uses too
        warnings.filterwarnings(
            "ignore", NON_ALPHANUMERIC_PATH_WARNING, category=NgioUserWarning
        )
        try:
            open_well(well_url).atomic_add_image(
                image_path, acquisition_id=acquisition, strict=True
            )
        # NgioValueError: the path is listed already; TimeoutError: the lock
        # (filelock.Timeout) was held by other runs for too long
        except (NgioValueError, TimeoutError):
            if image_path in open_well(well_url).paths():
                return False  # another run listed it in the meantime
            raise
    return True
