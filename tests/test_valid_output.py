"""Registered images, labels, wells and plates validate with ome-zarr-models.

The validator runs in its own process, importing only zarr and ome-zarr-models:
independent of ngio (which, imported in the same process, made ome-zarr-models
1.7 reject even ngio's own input images with a class-identity error).
"""

import json
import subprocess
import sys

import pytest
from _workflow import register, urls_of

VALIDATE = """
import json, sys
import zarr
from ome_zarr_models import v04, v05
models = {"0.4": v04, "0.5": v05}[sys.argv[1]]
checks = json.loads(sys.argv[2])
for kind, path in checks:
    model = getattr(models, kind).from_zarr(zarr.open_group(path, mode="r"))
    if kind in ("Image", "ImageLabel"):
        attrs = getattr(model.attributes, "ome", model.attributes)  # 0.5 nests
        print(kind, path, len(attrs.multiscales[0].datasets))
    else:
        print(kind, path, "ok")
"""


def _validate(version, checks):
    done = subprocess.run(
        [sys.executable, "-c", VALIDATE, version, json.dumps(checks)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("overwrite_input", [True, False])
def test_registered_output_is_valid_ome_zarr(make_plate, version, overwrite_input):
    plate = make_plate(ngff_version=version, n_acquisitions=2)
    register(plate, apply_args={"overwrite_input": overwrite_input})
    suffix = "" if overwrite_input else "_registered"
    checks = []
    for url in urls_of(plate):
        checks += [
            ("Image", f"{url}{suffix}"),
            ("ImageLabel", f"{url}{suffix}/labels/nuclei"),
        ]
    if overwrite_input:
        # The NGFF well schema allows only alphanumeric image paths, so a well
        # listing '<image>_registered' (fractal-tasks-core's naming, kept here)
        # cannot validate; wells and plates are checked when images are replaced.
        checks += [("HCS", plate.plate_url), ("Well", plate.plate_url + "/B/03")]
    lines = _validate(version, checks)
    url = urls_of(plate)[1] + suffix
    assert f"Image {url} 3" in lines
    assert f"ImageLabel {url}/labels/nuclei 3" in lines
