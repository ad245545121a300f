"""The registration workflow at real scale, through fractal-server, ours vs ftc.

Runs Calculate Registration (image-based) -> Find Registration Consensus ->
Apply Registration to Image through a real fractal-server (SLURM ``slurm_sudo``
runner by default, ``--local`` for the local runner) twice, on two copies of
one synthetic plate: once with this package (the wheel of the work tree) and
once with fractal-tasks-core 2.1 collected from the package index by the same
server. Every task process runs under GNU time (``.ci/e2e/measure.py``), so
both packages are measured alike: wall time from process start to exit and
peak RSS, per process (one per image for the compute parts, or per group of
images where the init groups them; one process for each init part).

It prints, per task part and package, the number of processes (and images),
wall s per image (median, max), peak MiB per process, CPU s per image (a
grouped process's time shared among its images), the wall time of the phase
(first start to last exit) and the ratios ours/ftc, plus the whole workflow;
then the resource hints (``meta``) derived from our peaks, and whether any
process exceeded the ``mem`` its task declared. JSON + Markdown go to
``benchmarks/out/results/``; raw records and task logs to
``benchmarks/out/run-fs-*/``.

The server, PostgreSQL and (by default) a one-node SLURM cluster come from
``.ci/fractal_server_e2e.sh --run=<this file>``, which calls this file back
inside the running set-up (the "inner" part below) and tears everything down
afterwards.

    .venv/bin/python benchmarks/bench_fractal_server.py --quick   # 4-7 min
    .venv/bin/python benchmarks/bench_fractal_server.py           # full plate, 8-11 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
CI = REPO / ".ci"
CONFIG_ENV = "FRACTAL_BENCH_CONFIG"

CALC = "Calculate Registration (image-based)"
CONSENSUS = "Find Registration Consensus"
APPLY = "Apply Registration to Image"
TASK_ORDER = [CALC, CONSENSUS, APPLY]
SHORT = {CALC: "Calculate", CONSENSUS: "Consensus", APPLY: "Apply"}
FTC = "fractal-tasks-core"


# ---------------------------------------------------------------------------
# Outer part: plate, harness, report
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small plate: 2 wells x 3 cycles x 2x2 FOVs of 540x640",
    )
    p.add_argument("--wells", help="comma-separated, default B03,B05,C03,C05")
    p.add_argument("--acquisitions", type=int, help="cycles per well (default 4)")
    p.add_argument("--fovs", help="FOV grid YxX (default 3x3)")
    p.add_argument("--fov", help="FOV size in px YxX (default 2160x2560)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--no-labels", action="store_true", help="no nuclei label image")
    p.add_argument("--wavelength-id", default="A01_C01")
    p.add_argument("--level-path", default="2")
    p.add_argument(
        "--overwrite-input",
        choices=("true", "false"),
        default="true",
        help="Apply's overwrite_input, the same for both packages",
    )
    p.add_argument("--local", action="store_true", help="local runner, not SLURM")
    p.add_argument(
        "--packages",
        default="ours,ftc",
        help="which packages to run, in this order (ours, ftc)",
    )
    p.add_argument("--ftc-version", default="2.1.0")
    p.add_argument(
        "--margin",
        type=float,
        default=0.25,
        help="resource hints: mem = peak x (1 + margin), rounded up",
    )
    p.add_argument("--round-mb", type=int, default=250)
    p.add_argument("--min-mb", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=5400, help="s per job")
    p.add_argument("--rebuild", action="store_true", help="rebuild the plate")
    p.add_argument(
        "--keep", action="store_true", help="keep the harness work dir (plates)"
    )
    return p.parse_args(argv)


def plate_spec(ns):
    sys.path.insert(0, str(HERE))
    import _synth

    def pair(text, default):
        return tuple(int(v) for v in (text or default).split("x"))

    if ns.quick:
        wells = (ns.wells or "B03,B05").split(",")
        n_acq = ns.acquisitions or 3
        fovs, fov = pair(ns.fovs, "2x2"), pair(ns.fov, "540x640")
    else:
        wells = (ns.wells or "B03,B05,C03,C05").split(",")
        n_acq = ns.acquisitions or 4
        fovs, fov = pair(ns.fovs, "3x3"), pair(ns.fov, "2160x2560")
    return _synth, _synth.SynthSpec(
        fovs=fovs,
        fov_shape=fov,
        n_channels=ns.channels,
        n_acquisitions=n_acq,
        noise="fast",
        wells=tuple(wells),
        labels=not ns.no_labels,
    )


def command_line(argv) -> str:
    return " ".join(
        shlex.quote(a)
        for a in [".venv/bin/python", "benchmarks/bench_fractal_server.py", *argv]
    )


def outer(argv) -> int:
    ns = parse_args(argv)
    cmd_text = command_line(argv)
    t_start = time.time()
    _synth, spec = plate_spec(ns)
    print(f"[bench] plate: {_synth.describe(spec)}", flush=True)
    t0 = time.time()
    plate_dir, manifest = _synth.get_plate(
        OUT / "plates", "fs", spec, rebuild=ns.rebuild, log=print
    )
    plate_s = time.time() - t0
    disk = _synth.dir_bytes(plate_dir)
    raw = _synth.level0_bytes_per_image(spec) * len(manifest["zarr_urls"])
    print(
        f"[bench] {len(manifest['zarr_urls'])} images, level-0 intensities "
        f"{raw / 1e9:.2f} GB uncompressed, {disk / 1e9:.2f} GB on disk "
        f"(all levels, labels, tables)",
        flush=True,
    )
    free = shutil.disk_usage("/tmp").free
    need = 3 * disk
    if free < need:
        print(
            f"[bench] not enough disk in /tmp: {free / 1e9:.1f} GB < {need / 1e9:.1f}"
        )
        return 1

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = OUT / f"run-fs-{stamp}"
    run_dir.mkdir(parents=True)
    config = {
        "plate_dir": str(plate_dir),
        "zarr_urls": manifest["zarr_urls"],
        "n_acquisitions": spec.n_acquisitions,
        "wavelength_id": ns.wavelength_id,
        "level_path": ns.level_path,
        "overwrite_input": ns.overwrite_input == "true",
        "packages": ns.packages.split(","),
        "ftc_version": ns.ftc_version,
        "timeout": ns.timeout,
        "run_dir": str(run_dir),
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    harness = ["bash", str(CI / "fractal_server_e2e.sh")]
    if not ns.local:
        harness.append("--slurm")
    harness.append(f"--run={Path(__file__).resolve()}")
    env = dict(os.environ, **{CONFIG_ENV: str(run_dir / "config.json")})
    env.setdefault("FRACTAL_E2E_PKG_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    if ns.keep:
        env["FRACTAL_E2E_KEEP"] = "1"
    print(f"[bench] {' '.join(harness)}", flush=True)
    rc = subprocess.run(harness, env=env).returncode
    results_file = run_dir / "results.json"
    if not results_file.exists():
        print(f"[bench] no results (harness exit {rc}); see the output above")
        return rc or 1
    res = json.loads(results_file.read_text())
    res["plate"] = {
        "describe": _synth.describe(spec),
        "images": len(manifest["zarr_urls"]),
        "level0_gb": round(raw / 1e9, 2),
        "disk_gb": round(disk / 1e9, 2),
        "dir": str(plate_dir),
        "build_or_reuse_s": round(plate_s, 1),
    }
    res["command"] = cmd_text
    res["total_s"] = round(time.time() - t_start, 1)
    res["hints"] = resource_hints(res, ns)
    res["harness_exit"] = rc
    md = report(res, ns)
    print()
    print(md)
    name = "bench_fractal_server" + ("_quick" if ns.quick else "")
    (OUT / "results").mkdir(parents=True, exist_ok=True)
    (OUT / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))
    (OUT / "results" / f"{name}.md").write_text(md + "\n")
    shutil.copy(results_file, run_dir / "results-final.json")
    print(f"[bench] wrote benchmarks/out/results/{name}.json and .md; raw: {run_dir}")
    failed = [p for p, r in res["packages"].items() if r["status"] != "done"]
    return 1 if (rc or failed) else 0


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def resource_hints(res, ns) -> dict:
    """Suggested meta for our tasks from the measured peaks (max over images)."""
    ours = res["packages"].get("ours")
    if not ours:
        return {}
    hints = {}
    for row in ours["rows"]:
        peak = row["peak_mib"]["max"]
        mem = math.ceil(peak * (1 + ns.margin) / ns.round_mb) * ns.round_mb
        mem = max(ns.min_mb, mem)
        # a second CPU only for a part that keeps more than one core busy at
        # least a quarter of its wall time; never more than it declared now
        declared = row["declared"].get("cpus_per_task", 1)
        util = row["cpu_util"] or 0.0
        cpus = min(declared, max(1, math.ceil(util - 0.25)))
        hints[f"{row['task']}|{row['part']}"] = {
            "task": row["task"],
            "part": row["part"],
            "peak_mib": round(peak, 1),
            "cpu_util": row["cpu_util"],
            "declared": row["declared"],
            "suggested": {"cpus_per_task": cpus, "mem": mem},
        }
    return hints


def report(res, ns) -> str:
    pk = res["packages"]
    names = [n for n in ("ours", "ftc") if n in pk]
    L = []
    plate = res["plate"]
    L.append("### Registration workflow through fractal-server")
    L.append("")
    L.append(
        f"Plate: {plate['describe']} ({plate['images']} images, "
        f"{plate['level0_gb']} GB of level-0 intensities, {plate['disk_gb']} GB "
        f"on disk). fractal-server {res['server_version']}, "
        f"{res['backend']} runner; ours = fractal-tasks "
        f"{pk.get('ours', {}).get('version', '-')}, ftc = fractal-tasks-core "
        f"{pk.get('ftc', {}).get('version', '-')}. Arguments: "
        f"`{json.dumps(res['workflow_args'])}`."
    )
    L.append("")
    L.append(
        "| task | part | pkg | processes (images) | wall s/image median | max "
        "| peak MiB/process median | max | CPU s/image median | phase wall s "
        "| declared cpus / mem MB |"
    )
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for task in TASK_ORDER:
        for part in ("init", "compute"):
            for n in names:
                row = _row(pk[n], task, part)
                if row is None:
                    continue
                d = row["declared"]
                images = row.get("images", row["n"])
                served = f" ({images})" if images != row["n"] else ""
                L.append(
                    f"| {SHORT[task]} | {part} | {n} | {row['n']}{served} "
                    f"| {_fmt(row['wall_s']['median'])} | {_fmt(row['wall_s']['max'])} "
                    f"| {_fmt(row['peak_mib']['median'], 0)} "
                    f"| {_fmt(row['peak_mib']['max'], 0)} "
                    f"| {_fmt(row['cpu_s']['median'])} | {_fmt(row['phase_s'])} "
                    f"| {d.get('cpus_per_task', '-')} / {d.get('mem', '-')} |"
                )
    for n in names:
        r = pk[n]
        L.append(
            f"| **workflow** | | {n} | {r['n_processes']} | | | | "
            f"{_fmt(r['peak_mib_max'], 0)} | | **{_fmt(r['job_s'])}** | |"
        )
    L.append("")
    if len(names) == 2:
        L.append("Ratios ours / ftc (below 1: ours is faster or smaller):")
        L.append("")
        L.append(
            "| task | part | wall/image median | wall/image max "
            "| peak/process median | peak/process max | phase wall |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for task in TASK_ORDER:
            for part in ("init", "compute"):
                a, b = _row(pk["ours"], task, part), _row(pk["ftc"], task, part)
                if a is None or b is None:
                    continue
                cells = [
                    _ratio(a["wall_s"]["median"], b["wall_s"]["median"]),
                    _ratio(a["wall_s"]["max"], b["wall_s"]["max"]),
                    _ratio(a["peak_mib"]["median"], b["peak_mib"]["median"]),
                    _ratio(a["peak_mib"]["max"], b["peak_mib"]["max"]),
                    _ratio(a["phase_s"], b["phase_s"]),
                ]
                L.append(
                    f"| {SHORT[task]} | {part} | "
                    + " | ".join(_fmt(c, 2) for c in cells)
                    + " |"
                )
        L.append(
            f"| **workflow** | | | | | "
            f"{_fmt(_ratio(pk['ours']['peak_mib_max'], pk['ftc']['peak_mib_max']), 2)} "
            f"| **{_fmt(_ratio(pk['ours']['job_s'], pk['ftc']['job_s']), 2)}** |"
        )
        L.append("")
    L.append(
        "wall: process start to exit (GNU time), per image: a compute process "
        "that serves a group of images (ours: Calculate, one per well) counts "
        "its share for each; peak: that process's max RSS; CPU: user + system; "
        "phase wall: first start to last exit of the part's processes; workflow "
        "wall: job submission to the job's end as the server reports it."
    )
    L.append("")
    for n in names:
        r = pk[n]
        if r["status"] != "done":
            L.append(f"**{n}: job status {r['status']!r}** (see {r['job_dir_copy']})")
            L.append("")
    exceeded = []
    for n in names:
        for row in pk[n]["rows"]:
            mem = row["declared"].get("mem")
            if mem is not None and row["peak_mib"]["max"] > mem:
                exceeded.append(
                    f"{n} {SHORT[row['task']]} {row['part']}: "
                    f"{row['peak_mib']['max']:.0f} MiB > {mem} MB"
                )
    L.append("Declared mem exceeded: " + ("; ".join(exceeded) if exceeded else "none"))
    L.append("")
    if res.get("hints"):
        L.append(
            f"Resource hints for ours: mem = max peak x {1 + ns.margin:.2f}, "
            f"rounded up to {ns.round_mb} MB, at least {ns.min_mb} MB; "
            "cpus_per_task = ceil(CPU utilisation - 0.25), at least 1 and at most "
            "the declared value (CPU utilisation = CPU s / wall s of all the "
            "part's processes):"
        )
        L.append("")
        L.append("| task | part | max peak MiB | CPU util | declared | suggested |")
        L.append("|---|---|---:|---:|---|---|")
        for h in res["hints"].values():
            d, s = h["declared"], h["suggested"]
            L.append(
                f"| {SHORT[h['task']]} | {h['part']} | {h['peak_mib']:.0f} "
                f"| {_fmt(h['cpu_util'], 2)} "
                f"| {d.get('cpus_per_task')} / {d.get('mem')} "
                f"| {s['cpus_per_task']} / {s['mem']} |"
            )
        L.append("")
    L.append(
        f"Benchmark total {res['total_s'] / 60:.1f} min (plate "
        f"{plate['build_or_reuse_s']:.0f} s, server set-up, collections "
        + ", ".join(f"{n} {pk[n]['collection_s']:.0f} s" for n in names)
        + ", plate copies, both workflows)."
    )
    L.append("")
    L.append(f"Command: `{res['command']}`")
    return "\n".join(L)


def _row(pkg, task, part):
    for row in pkg["rows"]:
        if row["task"] == task and row["part"] == part:
            return row
    return None


# ---------------------------------------------------------------------------
# Inner part: runs inside .ci/fractal_server_e2e.sh --run=...
# ---------------------------------------------------------------------------
def inner() -> int:
    sys.path.insert(0, str(CI))
    sys.path.insert(0, str(CI / "e2e"))
    sys.dont_write_bytecode = True
    import fractal_server_e2e as e2e
    import measure

    cfg = json.loads(Path(os.environ[CONFIG_ENV]).read_text())
    env = os.environ
    work = Path(env["FRACTAL_E2E_WORK"])
    backend = env["FRACTAL_E2E_BACKEND"]
    slurm_user = env.get("FRACTAL_E2E_SLURM_USER")
    run_dir = Path(cfg["run_dir"])
    api = e2e.Client(env["FRACTAL_E2E_URL"])
    api.login(env["FRACTAL_E2E_EMAIL"], env["FRACTAL_E2E_PASSWORD"])

    def say(msg):
        print(f"[bench-inner] {msg}", flush=True)

    args = {
        CALC: {"wavelength_id": cfg["wavelength_id"], "level_path": cfg["level_path"]},
        CONSENSUS: {},
        APPLY: {
            "registered_roi_table": "FOV_ROI_table_registered",
            "overwrite_input": cfg["overwrite_input"],
        },
    }
    results = {
        "server_version": env.get("FRACTAL_E2E_SERVER_VERSION"),
        "backend": "SLURM (slurm_sudo)" if backend == "slurm" else "local",
        "workflow_args": {SHORT[k]: v for k, v in args.items()},
        "packages": {},
    }

    groups = {}
    for name in cfg["packages"]:
        t0 = time.time()
        if name == "ours":
            group = e2e.collect_wheel(api, Path(env["FRACTAL_E2E_WHEEL"]), 1800)
        else:
            group = e2e.collect_package(api, FTC, cfg["ftc_version"], 1800)
        tasks = {t["name"]: t for t in group["task_list"]}
        python = measure.task_python(tasks[CALC])
        records = work / "measure" / name
        measure.install_wrapper(python, records)
        say(f"{name}: {group['pkg_name']} {group['version']}; {python} wrapped")
        groups[name] = (group, tasks, records, time.time() - t0)

    project = api.post("/api/v2/project/", {"name": "bench"})
    pid = project["id"]
    for name in cfg["packages"]:
        group, tasks, records, coll_s = groups[name]
        ds = api.post(
            f"/api/v2/project/{pid}/dataset/",
            {
                "name": f"plate-{name}",
                "project_dir": env["FRACTAL_E2E_PROJECT_DIR"],
                "zarr_subfolder": f"zarr-{name}",
            },
        )
        zarr_dir = Path(ds["zarr_dir"])
        src_plate = Path(cfg["plate_dir"]) / "plate.zarr"
        t0 = time.time()
        zarr_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src_plate, zarr_dir / "plate.zarr")
        if backend == "slurm":
            subprocess.run(["chown", "-R", f"{slurm_user}:", str(zarr_dir)], check=True)
        os.sync()
        say(f"{name}: plate copied to {zarr_dir} in {time.time() - t0:.0f}s")
        old_root = str(Path(cfg["plate_dir"]))
        images = []
        for url in cfg["zarr_urls"]:
            rel = Path(url).relative_to(Path(old_root) / "plate.zarr")
            row, col, acq = rel.parts
            images.append(
                {
                    "zarr_url": str(zarr_dir / "plate.zarr" / rel),
                    "row": row,
                    "column": col,
                    "acquisition": int(acq),
                }
            )
        e2e.register_images(
            api,
            pid,
            ds["id"],
            {"plate_url": str(zarr_dir / "plate.zarr"), "images": images},
        )
        wf = e2e.make_workflow(
            api, pid, f"registration-{name}", [(t, args[t]) for t in TASK_ORDER], tasks
        )
        t0 = time.time()
        job = e2e.run_job(api, pid, wf, ds["id"], cfg["timeout"])
        job_s = time.time() - t0
        if job["status"] != "done":
            e2e.print_tail(job.get("log"), 80)
        n_reg = sum(
            1
            for im in e2e.dataset_images(api, pid, ds["id"])
            if im["types"].get("registered") is True
        )
        say(f"{name}: {n_reg} of {len(images)} images are registered=True")
        # keep the raw records and the job folder (logs, args)
        dest = run_dir / name
        shutil.copytree(records, dest / "records", dirs_exist_ok=True)
        job_dir = Path(job["working_dir"])
        if job_dir.exists():
            shutil.copytree(
                job_dir, dest / "job", dirs_exist_ok=True, ignore=_big_files
            )
        recs = measure.read_records(records)
        results["packages"][name] = package_result(
            measure, recs, tasks, group, job, job_s, coll_s, dest
        )
        results["packages"][name]["registered_images"] = n_reg
        say(f"{name}: job {job['status']} in {job_s:.0f}s, {len(recs)} processes")
        # free the disk before the next package's copy
        shutil.rmtree(zarr_dir / "plate.zarr", ignore_errors=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def _big_files(_dir, names):
    return [n for n in names if n.endswith((".zarr", ".pickle"))]


def _images_served(args: dict, part: str) -> int:
    """Images one process worked on: a compute item's image and its group."""
    if part != "compute":
        return 1
    return 1 + len((args.get("init_args") or {}).get("other_zarr_urls", []))


def package_result(measure, recs, tasks, group, job, job_s, coll_s, dest) -> dict:
    index = measure.script_index(list(tasks.values()))
    rows = []
    for task in TASK_ORDER:
        for part in ("init", "compute"):
            mine = [r for r in recs if index.get(r["script"]) == (task, part)]
            if not mine:
                continue
            served = [_images_served(r["args"], part) for r in mine]
            walls = [r["wall_s"] for r in mine]
            cpu = [r["user_s"] + r["sys_s"] for r in mine]
            starts = [r["start"] for r in mine if r["start"]]
            ends = [r["end"] for r in mine if r["end"]]
            rows.append(
                {
                    "task": task,
                    "part": part,
                    "n": len(mine),
                    "images": sum(served),
                    # a grouped process serves several images: its share each
                    "wall_s": measure.summarize([w / k for w, k in zip(walls, served)]),
                    "peak_mib": measure.summarize([r["peak_mib"] for r in mine]),
                    "cpu_s": measure.summarize([c / k for c, k in zip(cpu, served)]),
                    "cpu_util": round(sum(cpu) / sum(walls), 2) if sum(walls) else None,
                    "phase_s": (max(ends) - min(starts)) if starts and ends else None,
                    "failed": sum(1 for r in mine if r["exit"] != 0),
                    "declared": measure.declared_meta(tasks[task], part),
                    "per_image": [
                        {
                            "image": r["args"]
                            .get("zarr_url", "(init)")
                            .split("plate.zarr/")[-1],
                            "wall_s": r["wall_s"],
                            "peak_mib": round(r["peak_mib"], 1),
                            "cpu_s": round(r["user_s"] + r["sys_s"], 2),
                            "exit": r["exit"],
                        }
                        for r in mine
                    ],
                }
            )
    starts = [r["start"] for r in recs if r["start"]]
    ends = [r["end"] for r in recs if r["end"]]
    return {
        "package": group["pkg_name"],
        "version": group["version"],
        "status": job["status"],
        "job_s": round(job_s, 1),
        "processes_span_s": round(max(ends) - min(starts), 1) if starts else None,
        "n_processes": len(recs),
        "peak_mib_max": max((r["peak_mib"] for r in recs), default=None),
        "collection_s": round(coll_s, 1),
        "rows": rows,
        "job_dir_copy": str(dest / "job"),
    }


if __name__ == "__main__":
    if os.environ.get(CONFIG_ENV) and os.environ.get("FRACTAL_E2E_URL"):
        sys.exit(inner())
    sys.exit(outer(sys.argv[1:]))
