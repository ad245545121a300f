"""Per-process wall time and peak memory of the tasks a fractal-server runs.

Shared by the SLURM e2e test (``.ci/fractal_server_e2e.py``: no task may
exceed the ``mem`` it declares) and the fractal-server benchmark
(``benchmarks/bench_fractal_server.py``). Standard library only.

fractal-server starts every task as ``<task venv>/bin/python <script>
--args-json A --out-json B``. ``install_wrapper`` moves that ``bin/python``
aside (to ``bin/python-unwrapped``, in the same folder, so the interpreter
still finds the venv's ``pyvenv.cfg``) and puts a small shell script in its
place. The script keeps a copy of the args file, then runs the real
interpreter under GNU time (``/usr/bin/time``, Debian package ``time``), which
writes the elapsed wall time, the peak resident set size (``%M``, KiB: the
largest RSS of the process, or of a child it waited for), user and system CPU
seconds and the exit status. One record per process, whatever the runner
(local or SLURM) and whichever package the venv holds.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

GNU_TIME = "/usr/bin/time"
UNWRAPPED = "python-unwrapped"
MARKER = "# fractal-measure wrapper"

_WRAPPER = """#!/bin/sh
{marker}: runs the task's interpreter under GNU time and records, per
# process, its argv, a copy of its --args-json file and
# "wall_s maxrss_KiB user_s sys_s exit_status" (see .ci/e2e/measure.py).
rec="{records}/$(date +%s%N)-$$"
{{
    printf 'start %s\\n' "$(date +%s.%N)"
    for a in "$@"; do printf 'arg %s\\n' "$a"; done
}} >"$rec.info"
prev=""
for a in "$@"; do
    [ "$prev" = "--args-json" ] && cp "$a" "$rec.args.json" 2>/dev/null
    prev="$a"
done
{time} -f '%e %M %U %S %x' -o "$rec.time" "{real}" "$@"
rc=$?
printf 'end %s\\n' "$(date +%s.%N)" >>"$rec.info"
exit $rc
"""


def task_python(task: dict) -> Path:
    """The interpreter in a collected task's command (``<python> <script>``)."""
    cmd = task.get("command_parallel") or task.get("command_non_parallel")
    return Path(cmd.split()[0])


def install_wrapper(python: Path, records: Path) -> None:
    """Replace ``python`` by the measuring wrapper writing into ``records``.

    Idempotent. ``records`` is made world-writable (sticky) because the tasks
    may run as another user (SLURM ``slurm_sudo``).
    """
    if not Path(GNU_TIME).exists():
        raise RuntimeError(f"{GNU_TIME} not found (apt-get install time)")
    records.mkdir(parents=True, exist_ok=True)
    os.chmod(records, 0o1777)
    real = python.parent / UNWRAPPED
    if python.is_symlink() or MARKER not in _head(python):
        if real.exists() or real.is_symlink():
            real.unlink()
        python.rename(real)
    text = _WRAPPER.format(marker=MARKER, records=records, time=GNU_TIME, real=real)
    tmp = python.with_name(python.name + ".wrapper-tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.rename(python)


def uninstall_wrapper(python: Path) -> None:
    """Put the real interpreter back."""
    real = python.parent / UNWRAPPED
    if real.exists() or real.is_symlink():
        real.rename(python)


def _head(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(200).decode(errors="replace")
    except OSError:
        return ""


def read_records(records: Path) -> list[dict]:
    """One dict per finished process, oldest first.

    Keys: ``script`` (path of the task executable), ``args`` (the task's
    arguments, or ``{}``), ``start``/``end`` (epoch s, as seen by the
    wrapper), ``wall_s``, ``peak_mib``, ``user_s``, ``sys_s``, ``exit``.
    """
    out = []
    for time_file in sorted(records.glob("*.time")):
        stem = time_file.name[: -len(".time")]
        info = records / f"{stem}.info"
        if not info.exists():
            continue
        lines = [ln for ln in time_file.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        # "Command terminated by signal N" / "exited with non-zero status"
        # may come first; the format line is last
        wall, rss, user, sys_, status = lines[-1].split()
        argv, start, end = [], None, None
        for ln in info.read_text().splitlines():
            key, _, val = ln.partition(" ")
            if key == "arg":
                argv.append(val)
            elif key == "start":
                start = float(val)
            elif key == "end":
                end = float(val)
        script = next((a for a in argv if a.endswith(".py")), argv[0] if argv else "")
        args_file = records / f"{stem}.args.json"
        try:
            args = json.loads(args_file.read_text()) if args_file.exists() else {}
        except json.JSONDecodeError:
            args = {}
        out.append(
            {
                "id": stem,
                "script": script,
                "args": args,
                "start": start,
                "end": end,
                "wall_s": float(wall),
                "peak_mib": int(rss) / 1024.0,
                "user_s": float(user),
                "sys_s": float(sys_),
                "exit": int(status),
            }
        )
    out.sort(key=lambda r: r["start"] or 0.0)
    return out


def script_index(tasks: list[dict]) -> dict[str, tuple[str, str]]:
    """Executable path -> (task name, "init" | "compute") for a task group.

    The init part is the non-parallel command of a compound task; a parallel
    task's only part, and a compound task's parallel part, are "compute".
    """
    index = {}
    for t in tasks:
        if t.get("command_non_parallel"):
            part = "init" if t.get("command_parallel") else "compute"
            index[t["command_non_parallel"].split()[-1]] = (t["name"], part)
        if t.get("command_parallel"):
            index[t["command_parallel"].split()[-1]] = (t["name"], "compute")
    return index


def declared_meta(task: dict, part: str, override: dict | None = None) -> dict:
    """The meta a part of a task runs with: the workflow's over the manifest's."""
    if part == "init" or not task.get("command_parallel"):
        base = dict(task.get("meta_non_parallel") or {})
    else:
        base = dict(task.get("meta_parallel") or {})
    if override and part == "compute":
        base.update(override)
    return base


def summarize(values: list[float]) -> dict:
    """Median and max (None for an empty list)."""
    if not values:
        return {"median": None, "max": None}
    return {"median": statistics.median(values), "max": max(values)}
