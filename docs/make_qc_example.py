"""Make ``docs/qc-example.png``: the QC picture of a demo well with one bad FOV.

``.venv/bin/python docs/make_qc_example.py [OUTPUT.png]`` builds the demo's
synthetic plate (well B03 only), replaces the registration channel of FOV_4 in
acquisition 2 by noise, so that its shift falls back to the median of the good
FOVs, runs "Calculate Registration (image-based)" at level 2 as the demo does,
and renders the QC picture.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
from ngio import open_ome_zarr_container

from fractal_tasks.calculate_registration import calculate_registration
from fractal_tasks.init_calculate_registration import init_calculate_registration
from fractal_tasks.tools.demo import build_demo_plate
from fractal_tasks.tools.qc import render_well_qc
from fractal_tasks.tools.synthetic import REGISTRATION_WAVELENGTH


def empty_fov(zarr_url: str, fov: str, seed: int = 0) -> None:
    """Replace one FOV of the registration channel by noise of its background."""
    container = open_ome_zarr_container(zarr_url)
    image = container.get_image()
    channel = image.get_channel_idx(wavelength_id=REGISTRATION_WAVELENGTH)
    roi = {r.name: r for r in container.get_roi_table("FOV_ROI_table").rois()}[fov]
    pixels = image.get_roi(roi, channel_selection=channel)
    background = float(np.percentile(pixels, 5))
    noise = np.random.default_rng(seed).normal(background, 0.05 * background + 1)
    noisy = noise + np.random.default_rng(seed + 1).normal(
        0, 0.05 * background + 1, pixels.shape
    )
    image.set_roi(roi, noisy.clip(0).astype(pixels.dtype), channel_selection=channel)
    image.consolidate(mode="auto")


def main(output: str) -> None:
    """Build the plate in a temporary folder and write the picture to ``output``."""
    with tempfile.TemporaryDirectory() as tmp:
        plate = build_demo_plate(Path(tmp, "plate.zarr"), wells=("B03",))
        urls = [image.zarr_url for image in plate.images]
        empty_fov(urls[2], "FOV_4")
        init = init_calculate_registration(zarr_urls=urls, zarr_dir=tmp)
        for item in init["parallelization_list"]:
            calculate_registration(
                **item, wavelength_id=REGISTRATION_WAVELENGTH, level_path="2"
            )
        path = render_well_qc(
            f"{plate.plate_url}/B/03", output, wavelength_id=REGISTRATION_WAVELENGTH
        )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/qc-example.png")
