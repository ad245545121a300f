"""Open an input image and its label images, every pyramid level checked.

The metadata lists the levels; a copy or a conversion that was cut off can
leave one out, and ngio then says only "No array found at 2". These say which
image and what to do, before any task writes anything.

Labels are listed from the ``labels`` group with zarr itself: ngio lists them
only when that group carries the metadata version it expects, and ome-zarr-py
writes an NGFF 0.5 ``labels`` group without one. Each label image is opened
through ngio's label reader, which does not need the ``labels`` group.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import ngio
import zarr
from ngio import OmeZarrContainer, open_ome_zarr_container
from ngio.images import Label
from ngio.utils import NgioFileNotFoundError

from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError
from fractal_tasks.hcs.wells import require_local

T = TypeVar("T")


def open_image(zarr_url: str, *, read_only: bool = False) -> OmeZarrContainer:
    """Open an OME-Zarr image and check that each level of its pyramid exists.

    Args:
        zarr_url: The image's path.
        read_only: Open it so that nothing can be written through it (Apply's
            input); else tables can be added (Calculate, Consensus).

    Raises:
        RegistrationInputError: If the URL is not a local path (see
            :func:`~fractal_tasks.hcs.wells.require_local`), the image's
            metadata is missing or invalid, or a level it lists is missing.
    """
    require_local(zarr_url)
    try:
        container = open_ome_zarr_container(zarr_url, mode="r" if read_only else "r+")
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot open OME-Zarr image {zarr_url!r}: {error}. Check that it "
            "exists and is a valid OME-Zarr image."
        ) from error
    for path in container.level_paths:
        _level(zarr_url, partial(container.get_image, path=path))
    return container


def label_names(zarr_url: str) -> list[str]:
    """Names of the label images that the image's ``labels`` group lists.

    NGFF 0.4 keeps the list in the group's attributes, NGFF 0.5 under
    ``ome``; both are read, whether or not a version is given. An image
    without a ``labels`` folder has no labels.

    Raises:
        RegistrationInputError: If the ``labels`` folder exists but holds no
            readable group metadata, or its list is not a list of names.
    """
    folder = Path(zarr_url, "labels")
    if not folder.is_dir():
        return []
    try:
        attrs = zarr.open_group(str(folder), mode="r").attrs.asdict()
    except (zarr.errors.GroupNotFoundError, json.JSONDecodeError) as error:
        raise RegistrationInputError(
            f"The labels group of {zarr_url!r} has no readable metadata ({error}). "
            "Repair or delete its .zattrs/zarr.json."
        ) from error
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    names = ome.get("labels", []) if isinstance(ome, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RegistrationInputError(
            f"The labels group of {zarr_url!r} lists {names!r}; it must be a list "
            "of label names."
        )
    return names


def open_label_levels(zarr_url: str, name: str) -> list[Label]:
    """Every pyramid level of label image ``name``, finest first, read-only.

    The levels are the label's own (its multiscales metadata), which can be
    more or fewer than the image's.

    Raises:
        RegistrationInputError: If the label's metadata cannot be read or a
            level it lists is missing, naming the label.
    """
    url = f"{zarr_url}/labels/{name}"
    try:
        paths = _level(url, partial(ngio.open_label, url, mode="r")).meta.paths
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot read label {name!r} of {zarr_url!r}: {error}. Repair or "
            "re-create the label image."
        ) from error
    return [_level(url, partial(ngio.open_label, url, path=p, mode="r")) for p in paths]


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
