"""Write the synthetic plate for the e2e test and dump its truth as JSON.

Usage: python build_plate.py <plate.zarr path> <out.json>
Runs in the package's python (needs fractal_tasks).
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

from fractal_tasks.tools.synthetic import build_synthetic_plate  # noqa: E402

plate_path, out_json = sys.argv[1], sys.argv[2]
plate = build_synthetic_plate(
    plate_path,
    wells=("B03", "B05"),
    n_acquisitions=3,
    fovs=(2, 2),
    fov_shape=(128, 160),
    seed=0,
)
info = plate.to_json()
info["plate_url"] = plate.plate_url
info["images"] = [
    {
        "zarr_url": im.zarr_url,
        "row": im.row,
        "column": im.column,
        "well": im.well,
        "path": im.path,
        "acquisition": im.acquisition,
    }
    for im in plate.images
]
fov_names = [f"FOV_{i}" for i in range(1, 5)]
info["true_translation_um"] = {
    im.zarr_url: {
        roi: list(plate.true_translation_um(im.zarr_url, roi)) for roi in fov_names
    }
    for im in plate.images
}
with open(out_json, "w") as f:
    json.dump(info, f, indent=2)
print(f"[build_plate] wrote {len(plate.images)} images into {plate.plate_url}")
