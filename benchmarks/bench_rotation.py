#!/usr/bin/env python
"""Rotation between cycles: accuracy, verdicts and cost, translation vs rigid.

For each angle, a synthetic plate (1 well, 2x2 FOVs of 1080x1280 px, the
reference and one cycle rotated about the well's centre, subpixel shifts;
``--z N``: N planes, and a shift of up to one plane) is
registered at ``--level`` (default: Calculate's default ``level_path="2"``)
with both models, in this process. Per model the table gives the worst error
over the FOVs of the angle each measured and of the angle its stored
transform applies (0 under the translation model; under ``rigid`` the well's
one angle where the FOVs agree), the worst gap at the FOVs' corners between
the stored transform and the truth (level-0 px; what Apply then leaves), the
statuses, Calculate's ms per FOV and Apply's time for the rotated cycle.

Run with the project venv:
    .venv/bin/python benchmarks/bench_rotation.py [--angles 0 0.5 2] [--z 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ngio import open_ome_zarr_container

from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.registration.calculate import load_quality
from fractal_tasks.tools.synthetic import build_synthetic_plate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _workflow import calculate, consensus  # noqa: E402

ANGLES = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _plate(path: Path, angle: float, fovs: tuple[int, int] = (2, 2), n_z: int = 1):
    """The benchmark plate: 1 well, FOVs of 1080x1280 px, cycle 1 rotated.

    With ``n_z`` > 1, a 3D plate whose cycle 1 also moves by up to a plane.
    """
    return build_synthetic_plate(
        path,
        n_acquisitions=2,
        fovs=fovs,
        fov_shape=(1080, 1280),
        n_z=n_z,
        max_shift_z=int(n_z > 1),
        levels=4,
        seed=5,
        rotation_deg=(0.0, angle),
        subpixel=True,
        max_shift_fraction=0.01,
        labels=True,
    )


def _measure(plate, model: str, level: str) -> dict:
    started = time.perf_counter()
    calculate(plate, transform=model, level_path=level)
    calc_s = time.perf_counter() - started
    url = plate.images[1].zarr_url
    container = open_ome_zarr_container(url)
    quality = load_quality(container, "FOV_ROI_table")
    truth = plate.rotations_deg[url]
    gaps = list(plate.corner_errors(url).values())
    errors = [abs(v - truth) for v in quality["measured_rotation_deg"]]
    stored = [abs(v - truth) for v in quality["rotation_deg"]]
    consensus(plate)
    started = time.perf_counter()
    apply_registration_to_image(
        zarr_url=url,
        registered_roi_table="FOV_ROI_table_registered",
        overwrite_input=False,
    )
    apply_s = time.perf_counter() - started
    return {
        "angle error (°)": max(errors),
        "stored angle error (°)": max(stored),
        "corner gap (px)": max(gaps),
        "status": dict(Counter(quality["registration_status"])),
        "ms per FOV": 1000 * calc_s / (2 * len(quality)),
        "apply (s)": apply_s,
    }


RUNNER = Path(__file__).resolve().parent / "_task_runner.py"


def _apply_peak(plate, url: str) -> tuple[float, float]:
    """Apply on one image in a process of its own, as its executable runs it.

    Returns (seconds, peak RSS in MB).
    """
    spec = {
        "imports": ["fractal_tasks.apply_registration_to_image"],
        "steps": [
            # what the task's executable does first (see writer/memory.py)
            {"kind": "call", "func": "fractal_tasks.writer.memory:return_freed_memory"},
            {
                "kind": "each",
                "func": "fractal_tasks.apply_registration_to_image:"
                "apply_registration_to_image",
                "zarr_urls": [url],
                "kwargs": {
                    "registered_roi_table": "FOV_ROI_table_registered",
                    "overwrite_input": False,
                },
            },
        ],
    }
    folder = Path(plate.plate_url).parent
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path), str(result_path)], check=True
    )
    result = json.loads(result_path.read_text())
    return result["task_seconds"], result["maxrss_end_kb"] / 1024


def memory(tmp: str, angle: float) -> None:
    """Peak memory of Apply on a rotated well and on ones 4 and 16 times as large."""
    print("\n| well (FOVs of 1080x1280) | rotation | Apply (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for fovs in ((2, 2), (4, 4), (8, 8)):
        for turn in (0.0, angle):
            plate = _plate(Path(tmp, f"m{fovs[0]}_{turn}", "plate.zarr"), turn, fovs)
            calculate(plate, transform="rigid", level_path="2")
            consensus(plate)
            seconds, peak = _apply_peak(plate, plate.images[1].zarr_url)
            print(f"| {fovs[0]}x{fovs[1]} | {turn:g}° | {seconds:.2f} | {peak:.0f} |")
            shutil.rmtree(Path(plate.plate_url).parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--angles", type=float, nargs="*", default=ANGLES)
    parser.add_argument("--level", default="2", help="Calculate's level_path")
    parser.add_argument("--z", type=int, default=1, help="z planes (3D if > 1)")
    parser.add_argument(
        "--memory",
        type=float,
        default=None,
        metavar="ANGLE",
        help="instead: Apply's peak memory on 2x2, 4x4 and 8x8 FOVs, rotated or not",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.memory is not None:
        with tempfile.TemporaryDirectory() as tmp:
            memory(tmp, args.memory)
        print(
            f"\ncommand: .venv/bin/python benchmarks/bench_rotation.py --memory "
            f"{args.memory:g}"
        )
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for angle in args.angles:
            template = _plate(Path(tmp, "t", "plate.zarr"), angle, n_z=args.z)
            for model in ("translation", "rigid"):
                copy = Path(tmp, model, "plate.zarr")
                shutil.rmtree(copy.parent, ignore_errors=True)
                plate = template.copied_to(copy)
                rows.append((angle, model, _measure(plate, model, args.level)))
    print(
        "| angle (°) | model | measured angle error (°) | stored angle error (°) "
        "| corner gap (px) | status | Calculate ms/FOV | Apply (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for angle, model, r in rows:
        status = ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items()))
        print(
            f"| {angle:g} | {model} | {r['angle error (°)']:.3f} | "
            f"{r['stored angle error (°)']:.3f} | {r['corner gap (px)']:.2f} | "
            f"{status} | {r['ms per FOV']:.0f} | "
            f"{r['apply (s)']:.2f} |"
        )
    print(
        f"\ncommand: .venv/bin/python benchmarks/bench_rotation.py --level "
        f"{args.level} --z {args.z} --angles " + " ".join(f"{a:g}" for a in args.angles)
    )


if __name__ == "__main__":
    main()
