"""The input image's folder carried over into the registered one, metadata kept fresh.

Apply changes the pixels of the image and of its labels, and the ROI tables;
everything else in the folder (group and array metadata of every writer,
``omero``, coordinate transformations, chunking, sharding, codecs, unknown
groups and attributes) is copied byte for byte. Arrays whose pixels are
rewritten keep their metadata files and lose their chunks, so that they start
empty (every chunk at the fill value) with exactly the input's layout.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import zarr

from fractal_tasks.hcs.roi_tables import ZARR_V3_CONSOLIDATED_WARNING

METADATA_FILES = frozenset({".zarray", ".zattrs", ".zgroup", "zarr.json"})
"""The files of a zarr v2 or v3 node that hold its metadata, not its chunks."""

_NOT_A_NODE_WARNING = "Object at .* is not recognized as a component of a Zarr"


def copy_skeleton(
    source: Path, target: Path, emptied: Collection[str], left_out: Collection[str]
) -> None:
    """Copy the folder ``source`` to ``target``, minus some chunks and folders.

    Args:
        source: The input image's folder.
        target: Where the copy goes: an empty folder.
        emptied: Arrays (paths relative to ``source``, e.g. ``"0"`` or
            ``"labels/nuclei/s1"``) copied without their chunks: only the
            metadata files directly in the array's folder.
        left_out: Paths relative to ``source`` not copied at all.
    """
    emptied, left_out = set(emptied), set(left_out)

    def ignore(directory: str, names: list[str]) -> list[str]:
        relative = Path(directory).relative_to(source).as_posix()
        if relative in emptied:
            return [n for n in names if n not in METADATA_FILES]
        prefix = "" if relative == "." else f"{relative}/"
        return [n for n in names if f"{prefix}{n}" in left_out]

    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)


def has_consolidated_metadata(group: Path) -> bool:
    """Whether a zarr group keeps consolidated metadata (v2 ``.zmetadata`` or v3)."""
    if (group / ".zmetadata").is_file():
        return True
    metadata = group / "zarr.json"
    if not metadata.is_file():
        return False
    return json.loads(metadata.read_text()).get("consolidated_metadata") is not None


def refresh_consolidated_metadata(group: Path) -> bool:
    """Consolidate the metadata of ``group`` again if it kept consolidated metadata.

    A reader that trusts stale consolidated metadata sees the old arrays and
    tables, or fails on them; groups without it are left as they are.

    Returns:
        Whether the group had (and now has fresh) consolidated metadata.
    """
    if not has_consolidated_metadata(group):
        return False
    version: Literal[2, 3] = 3 if (group / "zarr.json").is_file() else 2
    with warnings.catch_warnings():
        # zarr says so for every v3 group; consolidating is what the group asks
        warnings.filterwarnings(
            "ignore", ZARR_V3_CONSOLIDATED_WARNING, category=UserWarning
        )
        # lock files beside the images (ngio's, ours) are no zarr nodes
        warnings.filterwarnings("ignore", _NOT_A_NODE_WARNING, category=UserWarning)
        zarr.consolidate_metadata(str(group), zarr_format=version)
    return True
