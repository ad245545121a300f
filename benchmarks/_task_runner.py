"""Child-process side of the benchmarks: run task functions from a JSON spec.

Usage: python _task_runner.py SPEC.json RESULT.json

Runs in whichever interpreter the parent picks (the project venv for our
package and the plain copy, benchmarks/.venv-ftc for fractal-tasks-core), so
only the standard library is imported at module level.

Spec format::

    {"sys_path": [...],                  # prepended to sys.path
     "imports": ["pkg.mod", ...],         # imported before the clock starts
     "steps": [
        {"kind": "init_then_compute",     # Fractal "compound" task
         "init": "mod:fn", "init_kwargs": {...},
         "compute": "mod:fn", "compute_kwargs": {...}},
        {"kind": "each",                  # parallel task, run sequentially
         "func": "mod:fn", "zarr_urls": [...], "kwargs": {...}},
        {"kind": "call", "func": "mod:fn", "kwargs": {...}}]}

The result file holds per-call wall times, the peak RSS reached after the
imports (the interpreter + library baseline) and at the end, and the error
traceback if any step failed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import sys
import time
import traceback
import warnings


def _resolve(ref: str):
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


def _maxrss_kb() -> int:
    """Peak RSS of this process image in KiB.

    /proc/self/status VmHWM belongs to the current address space only, so it
    is not polluted by the (possibly big) parent that forked us: ru_maxrss
    keeps the pre-exec high-water mark on Linux.  ru_maxrss is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _record_versions(result: dict) -> None:
    """Versions of the libraries loaded so far, and zarr's codec pipeline."""
    for name in ("ngio", "zarr", "zarrs", "dask", "numpy", "fractal_tasks_core"):
        m = sys.modules.get(name)
        if m is not None:
            result["versions"][name] = getattr(m, "__version__", "?")
    zarr = sys.modules.get("zarr")
    if zarr is not None and hasattr(zarr, "config"):
        result["zarr_codec_pipeline"] = zarr.config.get("codec_pipeline.path", None)


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return repr(obj)


def _run_steps(steps, calls):
    for step in steps:
        kind = step["kind"]
        if kind == "init_then_compute":
            init = _resolve(step["init"])
            compute = _resolve(step["compute"])
            t0 = time.perf_counter()
            plist = init(**step["init_kwargs"])["parallelization_list"]
            calls.append(
                {
                    "func": step["init"],
                    "seconds": time.perf_counter() - t0,
                    "n_items": len(plist),
                }
            )
            for item in plist:
                t0 = time.perf_counter()
                ret = compute(
                    zarr_url=item["zarr_url"],
                    init_args=item["init_args"],
                    **step.get("compute_kwargs", {}),
                )
                calls.append(
                    {
                        "func": step["compute"],
                        "zarr_url": item["zarr_url"],
                        "seconds": time.perf_counter() - t0,
                        "returned": _jsonable(ret),
                    }
                )
        elif kind == "each":
            func = _resolve(step["func"])
            for url in step["zarr_urls"]:
                t0 = time.perf_counter()
                ret = func(zarr_url=url, **step.get("kwargs", {}))
                calls.append(
                    {
                        "func": step["func"],
                        "zarr_url": url,
                        "seconds": time.perf_counter() - t0,
                        "returned": _jsonable(ret),
                    }
                )
        elif kind == "call":
            func = _resolve(step["func"])
            t0 = time.perf_counter()
            ret = func(**step.get("kwargs", {}))
            calls.append(
                {
                    "func": step["func"],
                    "seconds": time.perf_counter() - t0,
                    "returned": _jsonable(ret),
                }
            )
        else:
            raise ValueError(f"unknown step kind {kind!r}")


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    for p in reversed(spec.get("sys_path", [])):
        sys.path.insert(0, p)
    logging.basicConfig(
        level=getattr(logging, spec.get("log_level", "WARNING")),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    warnings.simplefilter("ignore")
    result = {
        "python": sys.executable,
        "pid": os.getpid(),
        "calls": [],
        "error": None,
        "versions": {},
    }
    t_start = time.perf_counter()
    try:
        for mod in spec.get("imports", []):
            importlib.import_module(mod)
        _record_versions(result)
        result["import_seconds"] = time.perf_counter() - t_start
        result["maxrss_after_import_kb"] = _maxrss_kb()
        # Tell the parent that imports are over: from now on it counts the
        # memory of our descendants (imports fork short-lived commands).
        open(result_path + ".imported", "w").close()
        t0 = time.perf_counter()
        try:
            _run_steps(spec["steps"], result["calls"])
        finally:
            result["task_seconds"] = time.perf_counter() - t0
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result["error"] = traceback.format_exc()
    _record_versions(result)  # zarr loads a configured codec pipeline lazily
    result["maxrss_end_kb"] = _maxrss_kb()
    result["children_maxrss_kb"] = resource.getrusage(
        resource.RUSAGE_CHILDREN
    ).ru_maxrss
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
