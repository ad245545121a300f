"""Label images of an OME-Zarr image, read from the metadata as any writer lays it.

ngio lists labels only when the ``labels`` group carries the metadata version
it expects; ome-zarr-py writes an NGFF 0.5 ``labels`` group without one, and
ngio then lists none. These helpers read the list with zarr itself, read-only,
and open each label image through ngio's label reader, which does not need
the ``labels`` group at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import zarr
from ngio import open_label
from ngio.images import Label

from fractal_tasks.hcs.errors import MISSING_OR_MALFORMED, RegistrationInputError


def label_names(image_url: str) -> list[str]:
    """Names of the label images that the image's ``labels`` group lists.

    NGFF 0.4 keeps the list in the group's attributes, NGFF 0.5 under
    ``ome``; both are read, whether or not a version is given. An image
    without a ``labels`` folder has no labels.

    Raises:
        RegistrationInputError: If the ``labels`` folder exists but holds no
            readable group metadata.
    """
    folder = Path(image_url, "labels")
    if not folder.is_dir():
        return []
    try:
        attrs = zarr.open_group(str(folder), mode="r").attrs.asdict()
    except (zarr.errors.GroupNotFoundError, json.JSONDecodeError) as error:
        raise RegistrationInputError(
            f"The labels group of {image_url!r} has no readable metadata ({error}). "
            "Repair or delete its .zattrs/zarr.json."
        ) from error
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    names = ome.get("labels", []) if isinstance(ome, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RegistrationInputError(
            f"The labels group of {image_url!r} lists {names!r}; it must be a list "
            "of label names."
        )
    return names


def open_label_levels(image_url: str, name: str) -> list[Label]:
    """Every pyramid level of label image ``name``, finest first, read-only.

    The levels are the label's own (its multiscales metadata), which can be
    more or fewer than the image's.

    Raises:
        RegistrationInputError: If the label's metadata cannot be read or a
            level it lists is missing, naming the label and the level.
    """
    url = f"{image_url}/labels/{name}"
    try:
        paths = open_label(url, mode="r").meta.paths
    except MISSING_OR_MALFORMED as error:
        raise RegistrationInputError(
            f"Cannot read label {name!r} of {image_url!r}: {error}. Repair or "
            "re-create the label image."
        ) from error
    levels = []
    for path in paths:
        try:
            levels.append(open_label(url, path=path, mode="r"))
        except MISSING_OR_MALFORMED as error:
            raise RegistrationInputError(
                f"Level {path!r} of label {name!r} of {image_url!r} is listed in "
                f"its metadata but cannot be opened ({error}). Re-create the "
                "label's pyramid, or remove the level from its metadata."
            ) from error
    return levels
