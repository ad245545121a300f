"""In-process runs of the three tasks, an independent oracle for apply, and
helpers that change or fingerprint a plate."""

import hashlib
from pathlib import Path

import numpy as np
from ngio import open_ome_zarr_container

from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.calculate_registration import calculate_registration
from fractal_tasks.find_consensus import find_consensus
from fractal_tasks.hcs.swap import LOCK_SUFFIX
from fractal_tasks.init_calculate_registration import init_calculate_registration
from fractal_tasks.init_find_consensus import init_find_consensus
from fractal_tasks.writer.pyramid import downsample


def tree_hash(root) -> str:
    """Digest of every path and file under ``root``: equal means unchanged."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.name.startswith(".") and path.name.endswith(LOCK_SUFFIX):
            continue  # the replace's lock files, made by readers too: no data
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def urls_of(plate):
    return [i.zarr_url for i in plate.images]


def calculate(plate, **args):
    urls = urls_of(plate)
    items = init_calculate_registration(zarr_urls=urls, zarr_dir=plate.plate_url)
    for item in items["parallelization_list"]:
        calculate_registration(
            **item, **{"wavelength_id": "A01_C01", "level_path": "0", **args}
        )
    return items["parallelization_list"]


def consensus(plate, **args):
    items = init_find_consensus(zarr_urls=urls_of(plate), zarr_dir=plate.plate_url)
    for item in items["parallelization_list"]:
        find_consensus(**item, **args)
    return items["parallelization_list"]


def apply(plate, **args):
    args = {"registered_roi_table": "FOV_ROI_table_registered", **args}
    return [apply_registration_to_image(zarr_url=u, **args) for u in urls_of(plate)]


def register(plate, calc_args=None, apply_args=None):
    calculate(plate, **(calc_args or {}))
    consensus(plate)
    return apply(plate, **(apply_args or {}))


def spatial_index(axes, box):
    return tuple(box.get(a, slice(None)) for a in axes)


def windows(zarr_url, table="FOV_ROI_table_registered"):
    """ROI name -> {axis: slice} in level-0 pixels, by plain rounding."""
    container = open_ome_zarr_container(zarr_url)
    image = container.get_image()
    ps = {"z": image.pixel_size.z, "y": image.pixel_size.y, "x": image.pixel_size.x}
    out = {}
    for roi in container.get_roi_table(table).rois():
        box = {}
        for axis in ("z", "y", "x"):
            if axis not in image.axes:
                continue
            s = roi[axis]
            a = int(round(s.start / ps[axis]))
            box[axis] = slice(a, a + int(round(s.length / ps[axis])))
        out[roi.name] = box
    return out


def expected_level0(source_array, axes, acq_windows, ref_windows):
    expected = np.zeros_like(source_array)
    for name, target in ref_windows.items():
        expected[spatial_index(axes, target)] = source_array[
            spatial_index(axes, acq_windows[name])
        ]
    return expected


def expected_pyramid(level0, axes, n_levels, kind):
    factors = tuple(2 if a in ("y", "x") else 1 for a in axes)
    levels = [level0]
    for _ in range(n_levels - 1):
        levels.append(downsample(levels[-1], factors, kind))
    return levels


def set_pixel_size(zarr_url, change):
    """Rewrite the y/x scales of an image and its labels (NGFF 0.4) as
    ``change(scale)``, as another converter's arithmetic would have written them.
    """
    import json

    for attrs in [Path(zarr_url, ".zattrs"), *Path(zarr_url).glob("labels/*/.zattrs")]:
        meta = json.loads(attrs.read_text())
        axes = [a["name"] for a in meta["multiscales"][0]["axes"]]
        for dataset in meta["multiscales"][0]["datasets"]:
            for transform in dataset["coordinateTransformations"]:
                if transform["type"] == "scale":
                    transform["scale"] = [
                        change(s) if a in ("y", "x") else s
                        for a, s in zip(axes, transform["scale"])
                    ]
        attrs.write_text(json.dumps(meta))
