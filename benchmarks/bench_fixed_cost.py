"""What every task process pays beyond its pixels, broken down (issue #19, goal 4).

Fractal starts one Python process per task and image. On a plate of 384 wells
x 20 cycles that is some 15,000 processes, and what each costs before and
after its pixels adds up. For every executable of our manifest, run as
Fractal runs it (``python <executable> --args-json A --out-json B``) on a
tiny plate (1 well, 2 cycles, one FOV of 256x320 px), in fresh processes,
best of ``--repeats``:

* **interpreter**: ``python -c pass``.
* **imports**: of the task module and the wrapper, timed inside the
  process; split per top-level package by ``python -X importtime`` (each
  module's own time, summed over the package) in a process of its own.
* **task wrapper**: fractal-task-tools' ``run_fractal_task`` around a task
  function that does nothing (its import is among the imports).
* **ours**: the task function's run, timed inside the process, less the
  wrapper's: our set-up (opening the plate, the tables, the metadata) and
  the compute on a FOV this small.
* **exit**: what is left of the wall time: the interpreter's shutdown
  (modules, threads), and its start beyond ``python -c pass``.
* **as shipped**: the executable itself, which ends its process at once
  after a success (``fractal_tasks.executable``): no teardown. Run right
  after the timed script in every repeat; both walls are medians.

Then, for each executable, which imported packages never run a line during
the task (a profiler hook on the task call records the package of every
Python and C function called): their import time is what a lazy import in
the package that imports them would save, per process.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fixed_cost.py            # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_OUT,
    fmt_table,
    log,
    machine_info,
    md_table,
    repro_command,
)

PYTHON = sys.executable
PACKAGE = Path(__file__).resolve().parents[1] / "fractal_tasks"
WRAPPER = "fractal_task_tools.task_wrapper"
TABLE = "FOV_ROI_table"
# in workflow order: each task module (its executable is <module>.py, its
# function <module>) and the kind of its arguments
STEPS = (
    ("init_calculate_registration", "init"),
    ("calculate_registration", "compute"),
    ("init_find_consensus", "init"),
    ("find_consensus", "compute"),
    ("apply_registration_to_image", "apply"),
)
# an executable of ours, as Fractal runs it, that times its own parts: the
# imports, and the wrapper's run of the task; "idle" is a task that does
# nothing (the wrapper's own cost)
_TIMED = """
import json, os, sys, time
started = time.perf_counter()
from pydantic import validate_call
from {wrapper} import run_fractal_task
{import_task}
imported = time.perf_counter()
run_fractal_task(task_function={function})
done = time.perf_counter()
with open(os.environ["FIXED_COST_TIMES"], "w") as f:
    json.dump({{"imports": imported - started, "run": done - imported}}, f)
"""
_IDLE = """
@validate_call
def idle(zarr_url: str) -> None:
    pass
"""
# run inside a child: the task call under a profiler hook, reporting which
# top-level packages ran any function
_USED_PACKAGES = """
import json, sys
from fractal_tasks.{module} import {module} as task
kwargs = json.loads(sys.argv[1])
ran = set()
def hook(frame, event, arg):
    if event == "call":
        ran.add(frame.f_globals.get("__name__", "").partition(".")[0])
    elif event == "c_call":
        ran.add((getattr(arg, "__module__", None) or "").partition(".")[0])
sys.setprofile(hook)
task(**kwargs)
sys.setprofile(None)
loaded = sorted({{m.partition(".")[0] for m in sys.modules}})
print(json.dumps({{"ran": sorted(ran - {{""}}), "loaded": loaded}}))
"""


def _wall(args: list[str], repeats: int) -> float:
    """Best wall time (s) of a command over ``repeats`` runs; fails loudly."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return best


def _timed(
    import_task: str,
    function: str,
    args: dict,
    workdir: Path,
    repeats: int,
    shipped: Path | None = None,
) -> dict[str, float]:
    """An executable's parts, timed inside it, and its wall time.

    The script of ``_TIMED`` runs the task as the executable does but exits
    as Python usually does; with ``shipped`` (the executable's file), that
    runs after it in every repeat, side by side. Returns the best of
    ``repeats`` of each part, and the median wall time of each command. The
    output JSON is removed before each run (the task wrapper refuses to
    overwrite one).
    """
    args_path, out = workdir / f"{function}.args.json", workdir / f"{function}.out.json"
    args_path.write_text(json.dumps(args))
    times = workdir / "times.json"
    script = _TIMED.format(wrapper=WRAPPER, import_task=import_task, function=function)
    files = ["--args-json", str(args_path), "--out-json", str(out)]
    commands = {"wall": [PYTHON, "-c", script, *files]}
    if shipped is not None:
        commands["shipped"] = [PYTHON, str(shipped), *files]
    walls: dict[str, list[float]] = {k: [] for k in commands}
    best = {"imports": float("inf"), "run": float("inf")}
    env = {**os.environ, "FIXED_COST_TIMES": str(times)}
    for _ in range(repeats):
        for name, command in commands.items():
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            walls[name].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise RuntimeError(f"{function} failed:\n{done.stderr[-3000:]}")
            if name == "wall":
                inside = json.loads(times.read_text())
                best = {k: min(best[k], inside[k]) for k in best}
    return {**best, **{k: statistics.median(v) for k, v in walls.items()}}


def import_times(module: str) -> dict[str, float]:
    """Seconds of each top-level package's own import time (``-X importtime``)."""
    done = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    per_package: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if found:
            per_package[found[2].partition(".")[0]] += int(found[1]) / 1e6
    return dict(per_package)


def _task_args(module: str, step: str, plate, plan: dict | None) -> dict:
    """The arguments of one executable, as Fractal gives them.

    A compute step gets the last item of its init's parallelization list
    (``plan``, the init's output), plus the workflow's arguments.
    """
    from fractal_tasks.tools.demo import REGISTRATION_WAVELENGTH  # noqa: PLC0415

    urls = [i.zarr_url for i in plate.images]
    if step == "init":
        return {"zarr_urls": urls, "zarr_dir": plate.plate_url}
    if step == "apply":
        return {"zarr_url": urls[1], "registered_roi_table": f"{TABLE}_registered"}
    assert plan is not None, "a compute step runs after its init"
    args = {**plan["parallelization_list"][-1], "input_roi_table": TABLE}
    if module == "calculate_registration":
        args["wavelength_id"] = REGISTRATION_WAVELENGTH
    return args


def measure(repeats: int, workdir: Path) -> tuple[list[dict], dict]:
    from fractal_tasks.tools.synthetic import build_synthetic_plate  # noqa: PLC0415

    plate = build_synthetic_plate(
        workdir / "plate.zarr",
        wells=("B03",),
        n_acquisitions=2,
        fovs=(1, 1),
        fov_shape=(256, 320),
        subpixel=True,
        seed=3,
    )
    interpreter = _wall([PYTHON, "-c", "pass"], repeats)
    idle_args = {"zarr_url": plate.images[1].zarr_url}
    wrapper = _timed(_IDLE, "idle", idle_args, workdir, repeats)["run"]
    rows, plan = [], None
    for module, step in STEPS:
        executable = f"{module}.py"
        args = _task_args(module, step, plate, plan)
        importing = f"from fractal_tasks.{module} import {module}"
        timed = _timed(importing, module, args, workdir, repeats, PACKAGE / executable)
        if step == "init":
            plan = json.loads((workdir / f"{module}.out.json").read_text())
        packages = import_times(f"fractal_tasks.{module}")
        used = subprocess.run(
            [PYTHON, "-c", _USED_PACKAGES.format(module=module), json.dumps(args)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        report = json.loads(used.stdout.strip().splitlines()[-1])
        idle = {
            p: s
            for p, s in packages.items()
            if p not in report["ran"] and p in report["loaded"] and s >= 0.005
        }
        rows.append(
            dict(
                executable=executable,
                total_s=timed["wall"],
                shipped_s=timed["shipped"],
                interpreter_s=interpreter,
                imports_s=timed["imports"],
                wrapper_s=wrapper,
                ours_s=max(0.0, timed["run"] - wrapper),
                # the median wall less the best parts: the teardown, roughly
                exit_s=timed["wall"] - interpreter - timed["imports"] - timed["run"],
                packages_s=packages,
                never_ran_s=idle,
            )
        )
    return rows, {"wrapper_run_s": wrapper}


def _top(packages: dict[str, float], n: int = 6) -> str:
    ordered = sorted(packages.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{p} {s:.2f}" for p, s in ordered)


HEADERS = [
    "executable", "interpreter", "imports", "wrapper", "ours", "exit",
    "wall with exit / as shipped", "largest imports (own time, s)",
]  # fmt: skip
LAZY_HEADERS = ["executable", "never ran (import s)", "saving s", "share of wall"]


def table_rows(rows: list[dict]) -> tuple[list[list], list[list]]:
    main_rows, lazy_rows = [], []
    for r in rows:
        main_rows.append(
            [r["executable"], f"{r['interpreter_s']:.2f}",
             f"{r['imports_s']:.2f}", f"{r['wrapper_s']:.2f}", f"{r['ours_s']:.2f}",
             f"{r['exit_s']:.2f}", f"{r['total_s']:.2f} / {r['shipped_s']:.2f}",
             _top(r["packages_s"])]
        )  # fmt: skip
        saving = sum(r["never_ran_s"].values())
        lazy_rows.append(
            [r["executable"], _top(r["never_ran_s"], 8), f"{saving:.2f}",
             f"{saving / r['total_s']:.0%}"]
        )  # fmt: skip
    return main_rows, lazy_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "results")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        rows, wrapper = measure(args.repeats, Path(tmp))
    main_rows, lazy_rows = table_rows(rows)
    log(fmt_table(HEADERS, main_rows, "lrrrrrrl"))
    log()
    log("Imported packages that never ran during the task (a lazy import saves):")
    log(fmt_table(LAZY_HEADERS, lazy_rows, "llrr"))
    meta = dict(command=repro_command(), machine=machine_info(), wrapper=wrapper)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fixed_cost.json").write_text(
        json.dumps(dict(meta=meta, rows=rows), indent=1)
    )
    (args.out / "bench_fixed_cost.md").write_text(
        "\n\n".join(
            [
                "# Fixed cost per task process",
                f"`{meta['command']}`",
                md_table(HEADERS, main_rows),
                "Imported packages that never ran during the task:",
                md_table(LAZY_HEADERS, lazy_rows),
            ]
        )
        + "\n"
    )
    log(f"command: {meta['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
