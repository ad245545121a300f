"""Open an input image (or label) whose every pyramid level is on disk.

The metadata lists the levels; a copy or a conversion that was cut off can
leave one out, and ngio then says only "No array found at 2". These say which
image and what to do, before any task writes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

from ngio import OmeZarrContainer, open_ome_zarr_container
from ngio.utils import NgioFileNotFoundError

from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError
from fractal_tasks.hcs.wells import require_local

T = TypeVar("T")


def open_image(zarr_url: str) -> OmeZarrContainer:
    """Open an OME-Zarr image and check that each level of its pyramid exists.

    Raises:
        RegistrationInputError: If the URL is not a local path (see
            :func:`~fractal_tasks.hcs.wells.require_local`), the image's
            metadata is missing or invalid, or a level it lists is missing.
    """
    require_local(zarr_url)
    try:
        container = open_ome_zarr_container(zarr_url)
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot open OME-Zarr image {zarr_url!r}: {error}. Check that it "
            "exists and is a valid OME-Zarr image."
        ) from error
    for path in container.level_paths:
        _level(zarr_url, partial(container.get_image, path=path))
    return container


def open_label(container: OmeZarrContainer, name: str, zarr_url: str):
    """Label image ``name`` of an image (level 0), each of its levels checked.

    Raises:
        RegistrationInputError: If a level of the label is missing.
    """
    url = f"{zarr_url}/labels/{name}"
    label = _level(url, partial(container.get_label, name))
    for path in label.meta.paths:
        _level(url, partial(container.get_label, name, path=path))
    return label


def _level(url: str, get: Callable[[], T]) -> T:
    """``get()``, a missing level as an error naming the image and the fix."""
    try:
        return get()
    except NgioFileNotFoundError as error:
        raise RegistrationInputError(
            f"{url!r} lacks a pyramid level that its metadata lists ({error}): "
            "the image is incomplete (e.g. a copy or a conversion that was cut "
            "off). Re-create or re-convert it."
        ) from error
