#!/usr/bin/env python
"""Benchmark "calculate registration": accuracy and time, ours vs fractal-tasks-core.

Builds plates with KNOWN per-FOV shifts (nucleus-like texture, shot + read
noise, different gain/background and per-nucleus stain intensity per cycle,
shifts up to --max-shift-fraction of the FOV), once with integer and once with
subpixel (1/8 px) shifts.  Each package then runs its own init + calculate
task on its own copy of the plate at --level-path, in its own subprocess, and
the script compares the stored translation_y/x columns (µm / level-0 pixel
size) with the truth.

Convention (shared by both packages, checked here against fractal-tasks-core):
the translation ``t`` of an acquisition's FOV satisfies ``acq[p] == ref[p + t]``
(acquisition pixel p shows what reference pixel p + t shows), which is what
``skimage.registration.phase_cross_correlation(ref, acq)`` returns.

Run with the project venv, e.g.
    /work/main/.venv/bin/python benchmarks/bench_calculate.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_FTC_VENV,
    DEFAULT_OUT,
    ensure_ftc_venv,
    fmt_table,
    importable,
    log,
    machine_info,
    md_table,
    parse_pair,
    repro_command,
    run_child,
    short_error,
)
from _synth import (  # noqa: E402
    SynthSpec,
    copy_plate,
    describe,
    get_plate,
    relocate_manifest,
)

LABELS = {"ours": "fractal_tasks (ours)", "ftc": "fractal-tasks-core 2.1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny plate for smoke-testing")
    p.add_argument(
        "--cases",
        default="integer,subpixel",
        help="comma list out of integer, subpixel",
    )
    p.add_argument("--fovs", help="FOV grid (default 2x2)")
    p.add_argument("--fov", help="FOV shape in px (default 2160x2560; quick 256x320)")
    p.add_argument("--nz", type=int, default=1)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--acquisitions", type=int, default=3)
    p.add_argument(
        "--levels", type=int, default=None, help="pyramid levels (default 5; quick 3)"
    )
    p.add_argument(
        "--max-shift-fraction",
        type=float,
        default=0.1,
        help="largest |shift| per axis as a fraction of the FOV size",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--level-path", default="2")
    p.add_argument("--wavelength-id", default="A01_C01")
    p.add_argument("--contenders", default="ours,ftc")
    p.add_argument("--details", action="store_true", help="print every ROI")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ftc-venv", type=Path, default=DEFAULT_FTC_VENV)
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def calc_spec(impl, urls, zarr_dir, args) -> dict:
    if impl == "ours":
        init = "fractal_tasks.init_calculate_registration:init_calculate_registration"
        compute = "fractal_tasks.calculate_registration:calculate_registration"
        imports = ["fractal_tasks.calculate_registration"]
    else:
        init = (
            "fractal_tasks_core.init_image_based_registration:"
            "init_image_based_registration"
        )
        compute = (
            "fractal_tasks_core.compute_image_based_registration:"
            "compute_image_based_registration"
        )
        imports = ["fractal_tasks_core.compute_image_based_registration"]
    return {
        "imports": imports,
        "log_level": args.log_level,
        "steps": [
            {
                "kind": "init_then_compute",
                "init": init,
                "init_kwargs": {
                    "zarr_urls": urls,
                    "zarr_dir": zarr_dir,
                    "reference_acquisition": 0,
                },
                "compute": compute,
                "compute_kwargs": {
                    "wavelength_id": args.wavelength_id,
                    "level_path": args.level_path,
                },
            }
        ],
    }


def make_spec(args, subpixel: bool) -> SynthSpec:
    fovs = parse_pair(args.fovs or "2x2")
    fov = parse_pair(args.fov or ("256x320" if args.quick else "2160x2560"))
    levels = args.levels or (3 if args.quick else 5)
    return SynthSpec(
        fovs=fovs,
        fov_shape=fov,
        n_z=args.nz,
        n_channels=args.channels,
        n_acquisitions=args.acquisitions,
        levels=levels,
        max_shift_px=0.0,
        max_shift_fraction=args.max_shift_fraction,
        subpixel=subpixel,
        seed=args.seed,
    )


def run_case(case, spec, args, pythons, run_dir, contenders):
    from _verify import translation_errors

    log(
        f"\n=== case {case}: {describe(spec)}, shifts up to "
        f"{spec.max_shift[0]:.0f}x{spec.max_shift[1]:.0f} px "
        f"(y x), {'1/8-px subpixel' if spec.subpixel else 'integer'}, "
        f"registration at level {args.level_path}"
    )
    src_dir, manifest = get_plate(
        args.out / "plates", f"calc-{case}", spec, rebuild=args.rebuild, log=log
    )
    truth = manifest["truth_px"]
    shifts = np.array([v for u in manifest["zarr_urls"][1:] for v in truth[u].values()])
    log(
        f"  true shifts (level-0 px): |y| up to {np.abs(shifts[:, 1]).max():.2f}, "
        f"|x| up to {np.abs(shifts[:, 2]).max():.2f}"
    )
    n_fov = spec.fovs[0] * spec.fovs[1]
    n_pairs = n_fov * (spec.n_acquisitions - 1)
    out = {"case": case, "spec": asdict(spec), "results": {}}
    for impl in contenders:
        if impl not in pythons:
            out["results"][impl] = {"error": "not available"}
            log(f"  [{impl}] skipped: not available")
            continue
        dst = run_dir / case / impl
        copy_plate(src_dir, dst)
        m = relocate_manifest(manifest, src_dir, dst)
        r = run_child(
            pythons[impl],
            calc_spec(impl, m["zarr_urls"], str(dst), args),
            run_dir / case / "logs",
            f"calc-{impl}",
            timeout=args.timeout,
        )
        res = {"run": r}
        if r.get("error"):
            log(f"  [{impl}] FAILED: {short_error(r)}  (log: {r['log']})")
        else:
            per = [
                c["seconds"]
                for c in r["calls"]
                if c["func"].endswith(
                    ("calculate_registration", "compute_image_based_registration")
                )
            ]
            summ, rows = translation_errors(m["zarr_urls"], m["truth_px"])
            # sign check: the same estimates against the negated truth
            neg = {
                u: {k: [-x for x in t] for k, t in d.items()}
                for u, d in m["truth_px"].items()
            }
            summ_neg, _ = translation_errors(m["zarr_urls"], neg)
            res.update(
                summary=summ,
                rows=rows,
                sign_check_negated_truth=summ_neg,
                seconds_per_fov=sum(per) / n_pairs if per else None,
            )
            log(
                f"  [{impl}] max |err| {summ['max_abs_err_px']:.3f} px, mean "
                f"{summ['mean_abs_err_px']:.3f} px over {summ['n']} ROIs "
                f"({summ['missing']} without a translation); "
                f"{res['seconds_per_fov']:.2f} s per FOV; peak RSS "
                f"{r['maxrss_kb'] / 1024:.0f} MiB; against the NEGATED truth the "
                f"mean error would be {summ_neg['mean_abs_err_px']:.1f} px"
            )
            if args.details:
                for row in rows:
                    log(
                        f"      {Path(row['url']).name} {row['roi']}: truth "
                        f"{row['truth'][1]:+.3f},{row['truth'][2]:+.3f}  est "
                        + (
                            f"{row['estimate'][1]:+.3f},{row['estimate'][2]:+.3f}"
                            if row.get("estimate")
                            else "none"
                        )
                    )
        out["results"][impl] = res
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    args.out = args.out.resolve()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out / f"run-calc-{stamp}"
    t_all = time.perf_counter()
    log(f"bench_calculate  {stamp}  machine: {machine_info()}")
    pythons = {}
    if "ours" in contenders:
        if importable("fractal_tasks.calculate_registration"):
            pythons["ours"] = sys.executable
        else:
            log("  note: fractal_tasks.calculate_registration is not importable")
    if "ftc" in contenders:
        py, msg = ensure_ftc_venv(args.ftc_venv, install=not args.no_install)
        log(f"  fractal-tasks-core venv: {msg}")
        if py:
            pythons["ftc"] = str(py)
    results = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        spec = make_spec(args, subpixel=(case == "subpixel"))
        results.append(run_case(case, spec, args, pythons, run_dir, contenders))

    headers = [
        "case",
        "package",
        "max |err| px",
        "mean |err| px",
        "ROIs",
        "missing",
        "s / FOV",
        "peak RSS MiB",
        "status",
    ]
    rows = []
    for res in results:
        for impl, r in res["results"].items():
            s = r.get("summary")
            run = r.get("run", {})
            if not s:
                rows.append(
                    [
                        res["case"],
                        LABELS[impl],
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "FAILED: " + (short_error(run, 1) or r.get("error", "?"))[:70],
                    ]
                )
                continue
            rows.append(
                [
                    res["case"],
                    LABELS[impl],
                    f"{s['max_abs_err_px']:.3f}",
                    f"{s['mean_abs_err_px']:.3f}",
                    s["n"],
                    s["missing"],
                    f"{r['seconds_per_fov']:.2f}",
                    f"{run['maxrss_kb'] / 1024:.0f}",
                    "ok",
                ]
            )
    log(
        "\n== calculate registration at level "
        f"{args.level_path}: error of the stored translation vs truth, in level-0 "
        "pixels (y and x pooled); s / FOV = compute-task time / (FOVs x non-reference "
        "acquisitions)"
    )
    log(fmt_table(headers, rows))
    log("\nreproduce with:\n  " + repro_command())
    log(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f}s")
    res_dir = args.out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": repro_command(),
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    (res_dir / f"bench_calculate-{stamp}.json").write_text(
        json.dumps(payload, indent=1, default=str)
    )
    (res_dir / f"bench_calculate-{stamp}.md").write_text(
        f"# bench_calculate {stamp}\n\n`{repro_command()}`\n\n"
        + md_table(headers, rows)
        + "\n"
    )
    log(
        f"results: {res_dir / f'bench_calculate-{stamp}.json'}  (child logs: {run_dir})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
