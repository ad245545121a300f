#!/usr/bin/env python
"""Benchmark "apply registration to image": ours vs fractal-tasks-core vs a plain copy.

For every selected plate the script

1. builds (or reuses from benchmarks/out/plates) a synthetic multiplexed plate
   with known per-FOV shifts (see fractal_tasks/tools/synthetic.py);
2. copies it once per task package and computes the registered ROI tables
   there with that package's own calculate + consensus tasks (timed, reported
   for information);
3. runs each contender in its own subprocess on warm page cache and records
   wall time, task time (excluding interpreter start-up and imports), CPU
   time and peak RSS (wait4 ru_maxrss of that very process):
     ours  = fractal_tasks.apply_registration_to_image over the 3 images
     ftc   = fractal_tasks_core 2.1 apply_registration_to_image (own venv)
     plain = numpy + zarr chunk-by-chunk copy + 2x2-mean pyramid (_plain_copy)
     floor = the codec floor: decode and encode, from bytes in memory, every
             chunk apply writes, with the array's own codec (_codec_floor)
4. checks the outputs (ours vs ftc level 0; residual shift after apply);
5. prints a table, the ratios and the command that reproduces the run, and
   stores everything as JSON + Markdown under benchmarks/out/results/.

Run with the project venv, e.g.
    /work/main/.venv/bin/python benchmarks/bench_apply.py --plate both --grow
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_FTC_VENV,
    DEFAULT_OUT,
    MB,
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
    warm_page_cache,
)
from _synth import (  # noqa: E402
    SynthSpec,
    copy_plate,
    describe,
    dir_bytes,
    get_plate,
    level0_bytes_per_image,
    relocate_manifest,
)

OURS_PKG = "fractal_tasks"
FOV_TABLE, WELL_TABLE = "FOV_ROI_table", "well_ROI_table"
WELL_ROI_NAME = "well_1"  # the single ROI of the synthetic well_ROI_table
CPU_PARAM_NAMES = (
    "num_workers",
    "max_workers",
    "n_workers",
    "workers",
    "cpus",
    "num_threads",
    "n_threads",
    "threads",
)
# Environment of our apply child per --zarr-io. zarr reads ZARR_* variables
# into its configuration when imported (donfig). zarrs is not made strict: it
# cannot decode the string columns of anndata ROI tables, and strict would make
# those reads fail instead of falling back to zarr's own pipeline.
ZARR_IO_ENV = {
    "files": {},
    "zarr": {"FRACTAL_TASKS_ZARR_IO": "1"},
    "zarrs": {
        "FRACTAL_TASKS_ZARR_IO": "1",
        "ZARR_CODEC_PIPELINE__PATH": "zarrs.ZarrsCodecPipeline",
    },
}
LABELS = {
    "ours": "fractal_tasks (ours)",
    "ftc": "fractal-tasks-core 2.1",
    "plain": "plain numpy+zarr copy",
    "floor": "codec floor (decode + encode in memory)",
}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--plate", choices=["2d", "3d", "both"], default="both")
    p.add_argument(
        "--grow",
        action="store_true",
        help="also run the 3D plate with --grow-fovs FOVs (memory should stay flat)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny plates for smoke-testing (explicit size flags still win)",
    )
    g = p.add_argument_group("plate sizes (defaults: full size / --quick size)")
    g.add_argument("--fovs-2d", help="FOV grid, e.g. 2x2")
    g.add_argument("--fov-2d", help="FOV shape in px, e.g. 2160x2560")
    g.add_argument("--channels-2d", type=int)
    g.add_argument("--fovs-3d", help="FOV grid of the 3D plate, e.g. 2x2")
    g.add_argument("--fov-3d", help="FOV shape of the 3D plate, e.g. 1080x1280")
    g.add_argument("--nz", type=int, help="z planes of the 3D plate")
    g.add_argument("--channels-3d", type=int)
    g.add_argument("--grow-fovs", help="FOV grid of the --grow plate, e.g. 4x4")
    g.add_argument(
        "--roi-table-2d",
        choices=[FOV_TABLE, WELL_TABLE],
        default=FOV_TABLE,
        help="ROI table registered and applied on the 2D plate",
    )
    g.add_argument(
        "--roi-table-3d",
        choices=[FOV_TABLE, WELL_TABLE],
        default=WELL_TABLE,
        help="ROI table of the 3D plates (whole well: the case where a task "
        "that loads each ROI whole needs memory growing with the well); with "
        "well_ROI_table every FOV of an acquisition gets the same shift",
    )
    g.add_argument(
        "--ngff",
        choices=["0.4", "0.5"],
        default="0.4",
        help="NGFF version of the plates: 0.4 = zarr v2, 0.5 = zarr v3",
    )
    g.add_argument("--acquisitions", type=int, default=3)
    g.add_argument("--levels", type=int, default=5)
    g.add_argument(
        "--chunks",
        default="fov",
        help="'fov' = (1,1,FOV_y,FOV_x) like the Fractal converters, "
        "'auto' = ngio/zarr heuristic, or 'c,z,y,x'",
    )
    g.add_argument(
        "--max-shift",
        type=float,
        default=6.0,
        help="largest per-axis shift between acquisitions, level-0 px",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--rotation-deg",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        default=(),
        help="per acquisition, its rotation about the well's centre, e.g. "
        "0,0.5,1 (a rotated acquisition's FOVs move as one piece)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--contenders",
        default="ours,ftc,plain,floor",
        help="comma list out of ours, ftc, plain, floor",
    )
    r.add_argument(
        "--tables",
        choices=["own", "ours", "ftc"],
        default="own",
        help="who computes the registered ROI tables: each package its "
        "own (default), or one package for both. With 'own', a "
        "package whose calculate/consensus fails falls back to "
        "the other's tables.",
    )
    r.add_argument(
        "--order",
        choices=["ref-last", "ref-first"],
        default="ref-last",
        help="order in which the apply tasks visit the images: the "
        "reference acquisition last (default; the others read its "
        "registered table before it is replaced) or first",
    )
    r.add_argument("--wavelength-id", default="A01_C01")
    r.add_argument("--level-path", default="2", help="level used by calculate")
    r.add_argument(
        "--transform",
        choices=["translation", "rigid"],
        default="translation",
        help="our Calculate's model (fractal-tasks-core registers translations)",
    )
    r.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="CPUs for our tasks: our child is pinned to the first N "
        "cores (our tasks size their pools from the affinity), "
        "FRACTAL_TASKS_CPUS=N is exported and N is passed if "
        "apply takes a workers-like argument; also the number of "
        "plain-copy threads. Default: all cores, unpinned",
    )
    r.add_argument(
        "--pin",
        action="store_true",
        help="with --cpus N: pin ftc and the plain copy to the same N cores too",
    )
    r.add_argument(
        "--zarr-io",
        choices=sorted(ZARR_IO_ENV),
        default="files",
        help="chunk I/O of our apply: 'files' = our chunk files (default), "
        "'zarr' = FRACTAL_TASKS_ZARR_IO=1 (zarr's default codec pipeline), "
        "'zarrs' = that plus zarr's configuration naming the zarrs codec "
        "pipeline (zarrs must be installed); the environment is set for our "
        "apply child only",
    )
    r.add_argument("--out", type=Path, default=DEFAULT_OUT)
    r.add_argument("--ftc-venv", type=Path, default=DEFAULT_FTC_VENV)
    r.add_argument(
        "--no-install",
        action="store_true",
        help="do not create the fractal-tasks-core venv if missing",
    )
    r.add_argument("--rebuild", action="store_true", help="ignore cached plates")
    r.add_argument("--keep", action="store_true", help="keep the per-run plate copies")
    r.add_argument("--no-verify", action="store_true")
    r.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds allowed per child process",
    )
    r.add_argument("--log-level", default="WARNING", help="log level inside the tasks")
    args = p.parse_args(argv)
    if args.zarr_io == "zarrs" and importlib.util.find_spec("zarrs") is None:
        p.error("--zarr-io zarrs needs the zarrs package: .venv/bin/pip install zarrs")
    return args


def plate_specs(args) -> list[tuple[str, SynthSpec, str]]:
    q = args.quick

    def pick(val, full, quick):
        return val if val is not None else (quick if q else full)

    common = dict(
        n_acquisitions=args.acquisitions,
        levels=args.levels,
        chunks=parse_chunks(args.chunks),
        max_shift_px=args.max_shift,
        seed=args.seed,
        noise="fast",
        rotation_deg=args.rotation_deg,
    )
    out = []
    if args.plate in ("2d", "both"):
        out.append(
            (
                "2d",
                SynthSpec(
                    fovs=parse_pair(pick(args.fovs_2d, "2x2", "2x2")),
                    fov_shape=parse_pair(pick(args.fov_2d, "2160x2560", "256x320")),
                    n_z=1,
                    n_channels=pick(args.channels_2d, 3, 3),
                    **common,
                    **_plate_kind(args.roi_table_2d, args),
                ),
                args.roi_table_2d,
            )
        )
    if args.plate in ("3d", "both"):
        spec3 = SynthSpec(
            fovs=parse_pair(pick(args.fovs_3d, "2x2", "2x2")),
            fov_shape=parse_pair(pick(args.fov_3d, "1080x1280", "128x160")),
            n_z=pick(args.nz, 20, 4),
            n_channels=pick(args.channels_3d, 2, 2),
            **common,
            **_plate_kind(args.roi_table_3d, args),
        )
        out.append(("3d", spec3, args.roi_table_3d))
        if args.grow:
            grow = SynthSpec(
                **{
                    **asdict(spec3),
                    "fovs": parse_pair(pick(args.grow_fovs, "4x4", "4x4")),
                }
            )
            out.append(("3d-grow", grow, args.roi_table_3d))
    return out


def _plate_kind(table: str, args) -> dict:
    """SynthSpec fields of the table's shift kind and of the NGFF version.

    Registering the whole well assumes the well moved as one piece.
    """
    return {"shift_per_well": table == WELL_TABLE, "ngff_version": args.ngff}


def parse_chunks(text: str) -> str | tuple[int, ...]:
    """'fov', 'auto' or 'c,z,y,x' (an explicit chunk shape)."""
    if text in ("fov", "auto"):
        return text
    return tuple(int(v) for v in text.split(","))


# --------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------


def calc_steps(impl: str, urls, zarr_dir, args, table: str) -> dict:
    if impl == "ours":
        mod = OURS_PKG
        steps = [
            {
                "kind": "init_then_compute",
                "init": f"{mod}.init_calculate_registration:"
                "init_calculate_registration",
                "init_kwargs": {
                    "zarr_urls": urls,
                    "zarr_dir": zarr_dir,
                    "reference_acquisition": 0,
                },
                "compute": f"{mod}.calculate_registration:calculate_registration",
                "compute_kwargs": {
                    "wavelength_id": args.wavelength_id,
                    "level_path": args.level_path,
                    "input_roi_table": table,
                    "transform": args.transform,
                },
            },
            {
                "kind": "init_then_compute",
                "init": f"{mod}.init_find_consensus:init_find_consensus",
                "init_kwargs": {"zarr_urls": urls, "zarr_dir": zarr_dir},
                "compute": f"{mod}.find_consensus:find_consensus",
                "compute_kwargs": {"input_roi_table": table},
            },
        ]
        imports = [f"{mod}.calculate_registration", f"{mod}.find_consensus"]
    else:
        mod = "fractal_tasks_core"
        steps = [
            {
                "kind": "init_then_compute",
                "init": f"{mod}.init_image_based_registration:"
                "init_image_based_registration",
                "init_kwargs": {
                    "zarr_urls": urls,
                    "zarr_dir": zarr_dir,
                    "reference_acquisition": 0,
                },
                "compute": f"{mod}.compute_image_based_registration:"
                "compute_image_based_registration",
                "compute_kwargs": {
                    "wavelength_id": args.wavelength_id,
                    "level_path": args.level_path,
                    "input_roi_table": table,
                },
            },
            {
                "kind": "init_then_compute",
                "init": f"{mod}.init_registration_consensus:"
                "init_registration_consensus",
                "init_kwargs": {
                    "zarr_urls": urls,
                    "zarr_dir": zarr_dir,
                    "reference_acquisition": 0,
                },
                "compute": f"{mod}.compute_registration_consensus:"
                "compute_registration_consensus",
                "compute_kwargs": {"input_roi_table": table},
            },
        ]
        imports = [
            f"{mod}.compute_image_based_registration",
            f"{mod}.compute_registration_consensus",
        ]
    return {"imports": imports, "steps": steps, "log_level": args.log_level}


def our_apply_cpu_kwargs(cpus) -> dict:
    """Pass --cpus to our apply if it grew a workers-like parameter."""
    if cpus is None:
        return {}
    try:
        from fractal_tasks.apply_registration_to_image import (
            apply_registration_to_image as fn,
        )

        params = inspect.signature(inspect.unwrap(fn)).parameters
    except Exception:  # noqa: BLE001
        return {}
    for name in CPU_PARAM_NAMES:
        if name in params:
            return {name: cpus}
    return {}


def apply_spec(
    impl: str, urls, args, table: str, plain_dst=None, src_urls=None
) -> dict:
    if impl == "ours":
        kwargs = {
            "registered_roi_table": f"{table}_registered",
            "overwrite_input": True,
        }
        kwargs.update(our_apply_cpu_kwargs(args.cpus))
        return {
            "imports": [f"{OURS_PKG}.apply_registration_to_image"],
            "steps": [
                # what the task's executable does first (Fractal runs the
                # executable; the function alone leaves the allocator alone)
                {
                    "kind": "call",
                    "func": f"{OURS_PKG}.writer.memory:return_freed_memory",
                },
                {
                    "kind": "each",
                    "func": f"{OURS_PKG}.apply_registration_to_image:"
                    "apply_registration_to_image",
                    "zarr_urls": urls,
                    "kwargs": kwargs,
                },
            ],
            "log_level": args.log_level,
        }
    if impl == "ftc":
        return {
            "imports": ["fractal_tasks_core.apply_registration_to_image"],
            "steps": [
                {
                    "kind": "each",
                    "func": "fractal_tasks_core.apply_registration_to_image:"
                    "apply_registration_to_image",
                    "zarr_urls": urls,
                    "kwargs": {
                        "registered_roi_table": f"{table}_registered",
                        "reference_acquisition": 0,
                        "register_labels": True,
                        "overwrite_input": True,
                    },
                }
            ],
            "log_level": args.log_level,
        }
    if impl == "floor":
        return {
            "imports": ["_codec_floor"],
            "steps": [
                {
                    "kind": "call",
                    "func": "_codec_floor:codec_floor",
                    "kwargs": {"src_urls": src_urls, "workers": args.cpus or 2},
                }
            ],
        }
    return {
        "imports": ["_plain_copy"],
        "steps": [
            {
                "kind": "call",
                "func": "_plain_copy:copy_images",
                "kwargs": {
                    "src_urls": src_urls,
                    "dst_dir": str(plain_dst),
                    "workers": args.cpus or 2,
                },
            }
        ],
    }


def timing(r: dict) -> str:
    return (
        f"{r['task_seconds']:.1f}s task, {r['wall_seconds']:.1f}s wall, "
        f"peak RSS {r['maxrss_kb'] / 1024:.0f} MiB"
    )


def copy_tables(src_urls, dst_urls):
    """Give dst images the tables (incl. registered ones) of src images."""
    for s, d in zip(src_urls, dst_urls, strict=True):
        shutil.rmtree(Path(d) / "tables", ignore_errors=True)
        shutil.copytree(Path(s) / "tables", Path(d) / "tables")


# --------------------------------------------------------------------------
# One plate
# --------------------------------------------------------------------------


def run_plate(name, spec, table, args, pythons, run_dir, contenders):
    log(
        f"\n=== plate {name}: {describe(spec)}, {spec.levels} levels, "
        f"chunks={spec.chunks}"
    )
    src_dir, manifest = get_plate(
        args.out / "plates", name, spec, rebuild=args.rebuild, log=log
    )
    src_urls = manifest["zarr_urls"]
    level0_mb = level0_bytes_per_image(spec) * len(src_urls) / MB
    disk_mb = dir_bytes(src_dir / "plate.zarr") / MB
    log(
        f"  level-0 data: {level0_mb:.0f} MB uncompressed over {len(src_urls)} images; "
        f"whole plate on disk {disk_mb:.0f} MB"
    )
    res = {
        "plate": name,
        "spec": asdict(spec),
        "level0_mb": level0_mb,
        "disk_mb": disk_mb,
        "build_seconds": manifest.get("build_seconds"),
        "calc": {},
        "apply": {},
        "notes": [],
    }
    pdir = run_dir / name
    work = {}

    # -- copies + registered tables (outside the apply timing) ------------
    for impl in [c for c in ("ours", "ftc") if c in contenders]:
        dst = pdir / impl
        t0 = time.perf_counter()
        copy_plate(src_dir, dst)
        log(f"  [{impl}] copied plate ({time.perf_counter() - t0:.1f}s)")
        work[impl] = relocate_manifest(manifest, src_dir, dst)["zarr_urls"]

    table_source = {}
    for impl in work:
        maker = impl if args.tables == "own" else args.tables
        if maker == "ftc" and "ftc" not in pythons:
            maker = None
        if maker == "ours" and not importable(f"{OURS_PKG}.calculate_registration"):
            maker = None
        if maker is None:
            table_source[impl] = None
            continue
        if maker != impl and maker in work:
            table_source[impl] = maker  # filled in after `maker` has run
            continue
        spec_calc = calc_steps(maker, work[impl], str(pdir / impl), args, table)
        r = run_child(
            pythons[maker],
            spec_calc,
            pdir / "logs",
            f"calc-{impl}",
            timeout=args.timeout,
        )
        res["calc"][impl] = r
        if r.get("error"):
            log(
                f"  [{impl}] calculate+consensus FAILED: {short_error(r)}  "
                f"(log: {r['log']})"
            )
            table_source[impl] = None
        else:
            n_fov = spec.fovs[0] * spec.fovs[1]
            per = [
                c["seconds"]
                for c in r["calls"]
                if "calculate" in c["func"] or "compute_image_based" in c["func"]
            ]
            log(
                f"  [{impl}] calculate+consensus OK: {timing(r)}"
                + (
                    f", {sum(per) / max(1, len(per) * n_fov):.2f}s per FOV"
                    if per
                    else ""
                )
            )
            table_source[impl] = impl
            try:
                from _verify import translation_errors

                truth = relocate_manifest(manifest, src_dir, pdir / impl)["truth_px"]
                if table == WELL_TABLE:  # one shift per acquisition
                    truth = {
                        u: {WELL_ROI_NAME: next(iter(t.values()))}
                        for u, t in truth.items()
                    }
                summ, _rows = translation_errors(work[impl], truth, table)
                r["accuracy"] = summ
                log(
                    f"  [{impl}] estimated shifts vs truth: max |err| "
                    f"{summ['max_abs_err_px']:.2f} px, "
                    f"mean {summ['mean_abs_err_px']:.2f} px "
                    f"(level-0 px, {summ['n']} ROIs, {summ['missing']} missing)"
                )
            except Exception as e:  # noqa: BLE001
                log(f"  [{impl}] could not read the stored translations: {e!r}")
    # fall back / share tables
    for impl in work:
        srcm = table_source.get(impl)
        if srcm == impl:
            continue
        donors = [d for d in work if table_source.get(d) == d]
        if srcm in donors:
            donor = srcm
        elif donors:
            donor = donors[0]
        else:
            donor = None
        if donor is None:
            res["notes"].append(f"{impl}: no registered ROI tables available")
            continue
        copy_tables(work[donor], work[impl])
        note = f"{impl}: apply uses the registered ROI tables computed by {donor}"
        res["notes"].append(note)
        log(f"  note: {note}")

    # -- the timed apply runs --------------------------------------------
    env_ours = dict(ZARR_IO_ENV[args.zarr_io])
    if args.cpus:
        env_ours["FRACTAL_TASKS_CPUS"] = str(args.cpus)
    # Our tasks size their thread pools from the CPU affinity (like a SLURM
    # job's CPU set), so --cpus pins our child; --pin pins every contender.
    pinned = set(range(args.cpus)) if args.cpus else None
    for impl in contenders:
        if impl in ("ours", "ftc") and impl not in work:
            continue
        if impl == "ftc" and "ftc" not in pythons:
            res["apply"][impl] = {"error": "fractal-tasks-core venv unavailable"}
            continue
        if impl == "ours" and not importable(f"{OURS_PKG}.apply_registration_to_image"):
            res["apply"][impl] = {
                "error": "fractal_tasks.apply_registration_to_image not importable yet"
            }
            log(f"  [{impl}] skipped: {res['apply'][impl]['error']}")
            continue
        if impl in work and any(f"{impl}: no registered" in n for n in res["notes"]):
            res["apply"][impl] = {"error": "no registered ROI tables"}
            log(f"  [{impl}] skipped: no registered ROI tables")
            continue
        if impl == "floor":
            spec_apply = apply_spec("floor", None, args, table, src_urls=src_urls)
            warm = warm_page_cache(src_dir)
            python = sys.executable
        elif impl == "plain":
            plain_dst = pdir / "plain"
            shutil.rmtree(plain_dst, ignore_errors=True)
            spec_apply = apply_spec(
                "plain", None, args, table, plain_dst=plain_dst, src_urls=src_urls
            )
            warm = warm_page_cache(src_dir)
            python = sys.executable
        else:
            urls = work[impl]
            if args.order == "ref-last":
                urls = urls[1:] + urls[:1]
            spec_apply = apply_spec(impl, urls, args, table)
            warm = warm_page_cache(pdir / impl)
            python = pythons[impl]
        r = run_child(
            python,
            spec_apply,
            pdir / "logs",
            f"apply-{impl}",
            env_extra=env_ours if impl == "ours" else None,
            # the floor is what our apply could reach on the same cores
            cpu_affinity=pinned if (impl in ("ours", "floor") or args.pin) else None,
            timeout=args.timeout,
        )
        r["warm_seconds"] = warm
        if impl == "floor" and not r.get("error"):
            # the timed part only: reading the chunk files into memory is not
            r["task_seconds"] = r["calls"][0]["returned"]["seconds"]
        res["apply"][impl] = r
        if r.get("error"):
            log(
                f"  [{impl}] apply FAILED after {r['wall_seconds']:.1f}s: "
                f"{short_error(r)}  (log: {r['log']})"
            )
        else:
            log(f"  [{impl}] apply: {timing(r)}")

    # -- checks -----------------------------------------------------------
    if not args.no_verify:
        res["verify"] = verify(res, work, src_urls, pdir, table)
    if not args.keep:
        for impl in ("ours", "ftc", "plain"):
            shutil.rmtree(pdir / impl, ignore_errors=True)
    return res


def verify(res, work, src_urls, pdir, table: str) -> dict:
    from _verify import compare_level0, listed_tables, residual_shifts

    out = {}
    ok = {k for k, v in res["apply"].items() if v and not v.get("error")}
    try:
        if {"ours", "ftc"} <= ok:
            cmp = [
                compare_level0(a, b)
                for a, b in zip(work["ours"], work["ftc"], strict=True)
            ]
            out["ours_vs_ftc_level0"] = cmp
            worst = max((c.get("max_abs_diff", -1) for c in cmp), default=-1)
            eq = min((c.get("frac_equal", 0.0) for c in cmp), default=0.0)
            same = all(c["same_shape"] for c in cmp)
            log(
                f"  info: ours vs ftc level 0 (ch 0, mid z): same shapes={same}, "
                f"min fraction identical={eq:.4f}, max |diff|={worst} (differs "
                f"wherever the two packages estimated different shifts)"
            )
        for impl in ("ours", "ftc"):
            if impl in ok:
                listed = {u: listed_tables(u) for u in work[impl]}
                out[f"tables_after_{impl}"] = listed
                bad = {
                    u.rsplit("/", 1)[-1]: t
                    for u, t in listed.items()
                    if isinstance(t, str)
                    or f"{table}_registered" not in t
                    or table not in t
                }
                if bad:
                    msg = (
                        f"PROBLEM {impl}: after apply, ngio lists for image(s) "
                        f"{sorted(bad)}: {list(bad.values())[0]!r} "
                        f"(expected {table} and {table}_registered)"
                    )
                    res["notes"].append(msg)
                    log("  " + msg)
                else:
                    log(f"  check {impl}: every output image lists its ROI tables")
                rs = residual_shifts(work[impl], rois_url=src_urls[0])
                out[f"residual_{impl}"] = rs
                vals = [v for k, v in rs.items() if k != "table"]
                log(
                    f"  check {impl}: residual shift after apply (level 2, "
                    f"in level-0 px, per acquisition): {vals}"
                )
        if "plain" in ok:
            c = compare_level0(src_urls[0], str(pdir / "plain" / "0"))
            out["plain_vs_source_level0"] = c
            log(
                f"  check plain copy == source level 0: "
                f"{c.get('max_abs_diff') == 0 and c.get('same_shape')}"
            )
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)
        log(f"  check failed: {e!r}")
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def summarize(results, args) -> str:
    headers = [
        "plate",
        "contender",
        "task s",
        "wall s",
        "MB/s",
        "peak RSS MiB",
        "RSS after import",
        "CPU s",
        "status",
    ]
    rows = []
    ratio_lines = []
    for res in results:
        mb = res["level0_mb"]
        for impl in ("ours", "ftc", "plain", "floor"):
            r = res["apply"].get(impl)
            if r is None:
                continue
            if r.get("error") or "task_seconds" not in r:
                rows.append(
                    [
                        res["plate"],
                        LABELS[impl],
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "FAILED: " + (short_error(r, 1) or "?")[:70],
                    ]
                )
                continue
            rows.append(
                [
                    res["plate"],
                    LABELS[impl],
                    f"{r['task_seconds']:.1f}",
                    f"{r['wall_seconds']:.1f}",
                    f"{mb / r['task_seconds']:.0f}",
                    f"{r['maxrss_kb'] / 1024:.0f}",
                    f"{r.get('maxrss_after_import_kb', 0) / 1024:.0f}",
                    f"{r['cpu_seconds']:.1f}",
                    "ok",
                ]
            )
        a = {
            k: v
            for k, v in res["apply"].items()
            if v and not v.get("error") and "task_seconds" in v
        }
        plate = res["plate"]

        def q(x, y, key, a=a):
            return a[x][key] / a[y][key]

        if "ours" in a and "ftc" in a:
            ratio_lines.append(
                f"{plate}: ours vs ftc: speed-up "
                f"x{q('ftc', 'ours', 'task_seconds'):.2f} (task time), "
                f"x{q('ftc', 'ours', 'wall_seconds'):.2f} (wall); "
                f"peak RSS ours/ftc = {q('ours', 'ftc', 'maxrss_kb'):.2f}"
            )
        for impl in ("ours", "ftc"):
            if impl in a and "floor" in a:
                ratio_lines.append(
                    f"{plate}: {impl} vs the codec floor: "
                    f"x{q(impl, 'floor', 'task_seconds'):.2f} of its time"
                )
            if impl in a and "plain" in a:
                ratio_lines.append(
                    f"{plate}: {impl} vs plain copy: time "
                    f"x{q(impl, 'plain', 'task_seconds'):.2f} of plain; "
                    f"peak RSS {impl}/plain = {q(impl, 'plain', 'maxrss_kb'):.2f}"
                )
    by = {r["plate"]: r for r in results}
    if "3d" in by and "3d-grow" in by:
        data_x = by["3d-grow"]["level0_mb"] / by["3d"]["level0_mb"]
        for impl in ("ours", "ftc", "plain"):
            a, b = by["3d"]["apply"].get(impl), by["3d-grow"]["apply"].get(impl)
            if all(r and "task_seconds" in r and not r.get("error") for r in (a, b)):
                ratio_lines.append(
                    f"grow 3d -> 3d-grow ({data_x:.0f}x data), {LABELS[impl]}: "
                    f"peak RSS x{b['maxrss_kb'] / a['maxrss_kb']:.2f}, "
                    f"time x{b['task_seconds'] / a['task_seconds']:.2f}"
                )
    calc_rows = []
    for res in results:
        for impl, r in res["calc"].items():
            acc = r.get("accuracy") or {}
            calc_rows.append(
                [
                    res["plate"],
                    LABELS[impl],
                    "FAILED" if r.get("error") else f"{r.get('task_seconds', 0):.1f}",
                    f"{r['maxrss_kb'] / 1024:.0f}",
                    "-"
                    if acc.get("max_abs_err_px") is None
                    else f"{acc['max_abs_err_px']:.2f} / {acc['mean_abs_err_px']:.2f}",
                    (short_error(r, 1)[:80] if r.get("error") else "ok"),
                ]
            )
    text = [
        "",
        "== apply registration: each contender in its own process "
        "(task s excludes interpreter start-up and imports; "
        "MB/s = level-0 MB / task s)",
        fmt_table(headers, rows),
        "",
    ]
    text += ratio_lines
    if calc_rows:
        text += [
            "",
            "== calculate + consensus (prepares the tables; not part of the "
            "apply timing)",
            fmt_table(
                [
                    "plate",
                    "package",
                    "task s",
                    "peak RSS MiB",
                    "shift err max/mean px",
                    "status",
                ],
                calc_rows,
            ),
        ]
    notes = [f"{r['plate']}: {n}" for r in results for n in r["notes"]]
    if notes:
        text += ["", "notes:"] + [f"  {n}" for n in notes]
    if args.cpus:
        text += [
            "",
            f"--cpus {args.cpus}: our child pinned to {args.cpus} core(s), "
            f"FRACTAL_TASKS_CPUS={args.cpus}"
            + (
                "; ftc and plain pinned too" if args.pin else "; ftc and plain unpinned"
            ),
        ]
    else:
        text += ["", "--cpus not given: every child may use all cores"]
    if args.zarr_io != "files":
        env = " ".join(f"{k}={v}" for k, v in ZARR_IO_ENV[args.zarr_io].items())
        text += ["", f"--zarr-io {args.zarr_io}: our apply child ran with {env}"]
    text += ["", "reproduce with:", "  " + repro_command()]
    return "\n".join(text), headers, rows, ratio_lines


def main(argv=None):
    args = parse_args(argv)
    args.out = args.out.resolve()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    t_all = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out / f"run-apply-{stamp}"
    log(f"bench_apply  {stamp}  machine: {machine_info()}")
    pythons = {"ours": sys.executable}
    if "ftc" in contenders:
        py, msg = ensure_ftc_venv(args.ftc_venv, install=not args.no_install)
        log(f"  fractal-tasks-core venv: {msg}")
        if py:
            pythons["ftc"] = str(py)
    if not importable(OURS_PKG + ".apply_registration_to_image"):
        log("  note: fractal_tasks.apply_registration_to_image is not importable yet")
    results = []
    for name, spec, table in plate_specs(args):
        results.append(run_plate(name, spec, table, args, pythons, run_dir, contenders))
    text, headers, rows, ratios = summarize(results, args)
    log(text)
    log(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f}s")
    res_dir = args.out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": repro_command(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "results": results,
    }
    (res_dir / f"bench_apply-{stamp}.json").write_text(
        json.dumps(payload, indent=1, default=str)
    )
    (res_dir / f"bench_apply-{stamp}.md").write_text(
        f"# bench_apply {stamp}\n\n`{repro_command()}`\n\n"
        + md_table(headers, rows)
        + "\n\n"
        + "\n".join(f"- {r}" for r in ratios)
        + "\n"
    )
    log(f"results: {res_dir / f'bench_apply-{stamp}.json'}  (child logs: {run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
