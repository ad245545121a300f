"""Cached benchmark plates: a thin layer over ``fractal_tasks.tools.synthetic``.

The package's generator renders and writes the plate (see its docstring for the
content and the shift convention). This module adds what only the benchmarks
need: a cache of built plates keyed by a hash of the spec and of the generator's
source, a JSON manifest with the truth next to each plate, plate copies and
directory sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fractal_tasks.tools import synthetic
from fractal_tasks.tools.synthetic import SynthSpec

COMPLETE_MARKER = "synth_plate.json"


def spec_key(spec: SynthSpec) -> str:
    """Cache key: the spec and the generator's source (a change rebuilds)."""
    blob = json.dumps(asdict(spec), sort_keys=True).encode()
    blob += Path(synthetic.__file__).read_bytes()
    return hashlib.sha1(blob).hexdigest()[:10]


def describe(spec: SynthSpec) -> str:
    text = (
        f"{spec.n_acquisitions} acquisitions x {spec.fovs[0]}x{spec.fovs[1]} "
        f"FOVs of {spec.fov_shape[0]}x{spec.fov_shape[1]} px, {spec.n_z} z, "
        f"{spec.n_channels} ch"
    )
    if len(spec.wells) > 1:
        text = f"{len(spec.wells)} wells x {text}"
    if spec.labels:
        text += f", labels {synthetic.LABEL_NAME!r}"
    return text


def level0_bytes_per_image(spec: SynthSpec) -> int:
    return int(np.prod(spec.shape)) * 2


def build_plate(plate_dir, spec: SynthSpec, log=print) -> dict:
    """Write the plate into plate_dir/plate.zarr; return the truth manifest."""
    plate_dir = Path(plate_dir)
    if plate_dir.exists():
        shutil.rmtree(plate_dir)
    plate_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plate = synthetic.build_plate(plate_dir / "plate.zarr", spec)
    seconds = {k: round(v, 2) for k, v in plate.seconds.items()}
    seconds["total"] = round(time.perf_counter() - t0, 2)
    manifest = {
        "spec": asdict(spec),
        "key": spec_key(spec),
        "zarr_urls": [i.zarr_url for i in plate.images],
        "wavelength_ids": spec.wavelength_ids,
        "truth_px": {
            url: {name: list(t) for name, t in fovs.items()}
            for url, fovs in plate.translations_px.items()
        },
        "build_seconds": seconds,
    }
    (plate_dir / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1))
    log(
        f"  built {plate_dir} in {seconds['total']:.1f}s "
        f"(render {seconds['render']:.1f}s, level-0 write "
        f"{seconds['write_level0']:.1f}s, pyramid {seconds['pyramid']:.1f}s)"
    )
    return manifest


def relocate_manifest(manifest: dict, old_dir, new_dir) -> dict:
    """Same manifest with zarr_urls/truth keys moved from old_dir to new_dir."""
    old, new = str(Path(old_dir)), str(Path(new_dir))

    def mv(u):
        return new + u[len(old) :] if u.startswith(old) else u

    out = dict(manifest)
    out["zarr_urls"] = [mv(u) for u in manifest["zarr_urls"]]
    out["truth_px"] = {mv(u): v for u, v in manifest["truth_px"].items()}
    return out


def get_plate(cache_root, name: str, spec: SynthSpec, rebuild=False, log=print):
    """Build (or reuse a cached, complete) plate; return (plate_dir, manifest)."""
    plate_dir = Path(cache_root) / f"{name}-{spec_key(spec)}"
    marker = plate_dir / COMPLETE_MARKER
    if marker.exists() and not rebuild:
        manifest = json.loads(marker.read_text())
        log(f"  reusing cached plate {plate_dir}")
        return plate_dir, manifest
    return plate_dir, build_plate(plate_dir, spec, log=log)


def copy_plate(src_dir, dst_dir) -> None:
    """Copy the plate directory (outside any timing) and flush it to disk."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    shutil.copytree(src_dir, dst_dir)
    os.sync()


def dir_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
