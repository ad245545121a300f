"""Demo: register a synthetic multiplexed plate the way Fractal runs the tasks.

``python -m fractal_tasks.tools.demo [--out DIR]`` builds a plate with known shifts,
runs each task as Fractal does (the init part once, then one compute process per
parallelization item, through the task executables and JSON argument files), and
prints, per FOV, the true and the recovered shift and where the outputs are.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import fractal_tasks
from fractal_tasks.tools.synthetic import (
    REGISTRATION_WAVELENGTH,
    SyntheticPlate,
    build_synthetic_plate,
)

PACKAGE_DIR = Path(fractal_tasks.__file__).parent
_RUN_NUMBERS = itertools.count()  # next() on it is atomic under the GIL


def run_task(executable: str, args: dict[str, Any], workdir: Path) -> Any:
    """Run one task executable as Fractal does; return its output JSON (or None).

    Raises:
        RuntimeError: With the task's log if it fails.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # Unique per call: runs go in parallel threads, and two runs sharing an
    # args file would both process the same image.
    stem = f"{Path(executable).stem}-{next(_RUN_NUMBERS)}"
    args_path, out_path = workdir / f"{stem}.args.json", workdir / f"{stem}.out.json"
    args_path.write_text(json.dumps(args))
    done = subprocess.run(
        [
            sys.executable,
            str(PACKAGE_DIR / executable),
            "--args-json",
            str(args_path),
            "--out-json",
            str(out_path),
        ],
        capture_output=True,
        text=True,
    )
    (workdir / f"{stem}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{executable} failed:\n{done.stderr[-4000:]}")
    text = out_path.read_text() if out_path.exists() else "null"
    return json.loads(text)


def run_compound(
    init: str,
    compute: str,
    zarr_urls: list[str],
    zarr_dir: str,
    args: dict,
    init_args: dict,
    workdir: Path,
    parallel: int = 2,
) -> list:
    """Run a compound task: init once, then one compute process per item."""
    plan = run_task(
        init, {"zarr_urls": zarr_urls, "zarr_dir": zarr_dir, **init_args}, workdir
    )
    items = plan["parallelization_list"]
    with ThreadPoolExecutor(parallel) as pool:
        return list(
            pool.map(lambda item: run_task(compute, {**item, **args}, workdir), items)
        )


def run_workflow(
    zarr_urls: list[str],
    zarr_dir: str,
    workdir: Path,
    *,
    wavelength_id: str = REGISTRATION_WAVELENGTH,
    level_path: str = "1",
    input_roi_table: str = "FOV_ROI_table",
    overwrite_input: bool = False,
) -> list[dict]:
    """Calculate, consensus and apply over ``zarr_urls``; the image list updates."""
    run_compound(
        "init_calculate_registration.py",
        "calculate_registration.py",
        zarr_urls,
        zarr_dir,
        {
            "wavelength_id": wavelength_id,
            "level_path": level_path,
            "input_roi_table": input_roi_table,
        },
        {},
        workdir,
    )
    run_compound(
        "init_find_consensus.py",
        "find_consensus.py",
        zarr_urls,
        zarr_dir,
        {"input_roi_table": input_roi_table},
        {},
        workdir,
    )
    with ThreadPoolExecutor(2) as pool:
        outputs = list(
            pool.map(
                lambda url: run_task(
                    "apply_registration_to_image.py",
                    {
                        "zarr_url": url,
                        "registered_roi_table": f"{input_roi_table}_registered",
                        "overwrite_input": overwrite_input,
                    },
                    workdir,
                ),
                zarr_urls,
            )
        )
    return [u for out in outputs for u in out["image_list_updates"]]


def build_demo_plate(
    path: Path, wells: tuple[str, ...] = ("B03", "B05")
) -> SyntheticPlate:
    """The demo's plate: 3 cycles, 2x2 FOVs of 256x320 px, subpixel shifts."""
    return build_synthetic_plate(
        path,
        wells=wells,
        n_acquisitions=3,
        fovs=(2, 2),
        fov_shape=(256, 320),
        subpixel=True,
        seed=7,
    )


def main(argv: list[str] | None = None) -> int:
    """Build the demo plate, register it, and print what was recovered."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fractal-tasks-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"Building a synthetic plate in {out} ...")
    plate = build_demo_plate(out / "plate.zarr")
    urls = [image.zarr_url for image in plate.images]
    print(
        f"{len(urls)} images, {len(plate.fov_names)} FOVs per image; running the "
        "three tasks (init + one process per item) ..."
    )
    updates = run_workflow(urls, str(out), out / "task-logs", level_path="2")
    from ngio import open_ome_zarr_container

    from fractal_tasks.registration.calculate import load_quality

    print(
        f"\n{'image':<22}{'FOV':<7}{'true (y, x) px':>18}{'recovered (y, x) px':>23}"
        f"{'error px':>10}  status"
    )
    errors = []
    for image in plate.images:
        if image.acquisition == 0:
            continue
        container = open_ome_zarr_container(image.zarr_url)
        quality = load_quality(container, "FOV_ROI_table")
        for roi in container.get_roi_table("FOV_ROI_table").rois():
            extra = roi.model_extra or {}
            found = np.array([extra["translation_y"], extra["translation_x"]])
            found /= plate.pixel_size
            fov = str(roi.name)
            true = np.array(plate.true_translation_px(image.zarr_url, fov)[1:], float)
            error = float(np.abs(found - true).max())
            errors.append(error)
            name = "/".join(image.zarr_url.split("/")[-3:])
            print(
                f"{name:<22}{fov:<7}{true[0]:>8.2f}, {true[1]:>7.2f}"
                f"{found[0]:>13.2f}, {found[1]:>7.2f}{error:>10.2f}  "
                f"{quality.loc[fov, 'registration_status']}"
            )
    print(
        f"\nLargest error {max(errors):.2f} px, mean {np.mean(errors):.2f} px "
        f"(level-0 pixels; shifts estimated at level 2)."
    )
    print(f"Plate:       {plate.plate_url}")
    print(
        f"Registered:  {len(updates)} images added to the wells, e.g. "
        f"{updates[1]['zarr_url']}"
    )
    print(f"Task logs:   {out / 'task-logs'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    # anndata's notice, on every table ngio writes into the plate (zarr v2)
    warnings.filterwarnings(
        "ignore",
        "Writing zarr v2 data will no longer be the default",
        category=UserWarning,
    )
    sys.exit(main())
