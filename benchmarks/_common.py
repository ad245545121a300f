"""Shared helpers for the benchmark scripts (parent-process side)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RUNNER = BENCH_DIR / "_task_runner.py"
DEFAULT_OUT = BENCH_DIR / "out"
DEFAULT_FTC_VENV = BENCH_DIR / ".venv-ftc"
FTC_REQUIREMENT = "fractal-tasks-core==2.1.*"
MB = 1e6


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_pair(text: str, sep: str = "x") -> tuple[int, int]:
    a, b = text.lower().split(sep)
    return int(a), int(b)


def repro_command() -> str:
    """The exact command line that produced this run (absolute interpreter)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_DIR)
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return (
        f"cd {shlex.quote(str(REPO_DIR))} && {sys.executable} {script} {args}".rstrip()
    )


def machine_info() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------
# fractal-tasks-core virtualenv
# --------------------------------------------------------------------------


def ftc_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def ftc_version(venv: Path) -> str | None:
    py = ftc_python(venv)
    if not py.exists():
        return None
    proc = subprocess.run(
        [str(py), "-c", "import fractal_tasks_core as m; print(m.__version__)"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_ftc_venv(venv: Path, install: bool = True) -> tuple[Path | None, str]:
    """Reuse benchmarks/.venv-ftc if it has fractal-tasks-core 2.1, else build it."""
    venv = Path(venv)
    ver = ftc_version(venv)
    if ver and ver.startswith("2.1"):
        return ftc_python(venv), f"reused {venv} (fractal-tasks-core {ver})"
    if not install:
        return None, f"no usable fractal-tasks-core 2.1 in {venv} (--no-install)"
    t0 = time.perf_counter()
    base = shutil.which("python3") or sys.executable
    log(f"  creating {venv} with {base} and installing {FTC_REQUIREMENT} ...")
    logf = venv.parent / "out" / "ftc-venv-install.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "w") as out:
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(ftc_python(venv)), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [
                str(ftc_python(venv)),
                "-m",
                "pip",
                "install",
                "-q",
                FTC_REQUIREMENT,
            ],
        ]
        for cmd in steps:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                return None, f"'{' '.join(cmd)}' failed (rc={rc}); see {logf}"
    ver = ftc_version(venv)
    if not ver:
        return None, f"fractal-tasks-core not importable after install; see {logf}"
    return (
        ftc_python(venv),
        f"installed fractal-tasks-core {ver} in {venv} "
        f"({time.perf_counter() - t0:.0f}s)",
    )


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------


def _tree_rss_kb(pid: int, descendants: bool) -> int:
    """Current RSS (KiB) of pid, plus the private memory of its descendants.

    A descendant counts only its private pages, and only once the caller says
    so: libraries fork short-lived commands while they are imported (``uname
    -p``), and such a fork shares the child's pages until it execs; counting
    them double-counted the child (393 MiB reported for a 249 MiB VmHWM).
    """
    try:
        total = _vm_rss_kb(pid)
        stack = _children(pid) if descendants else []
    except (OSError, ValueError):  # the child has just exited
        return 0
    seen = {pid}
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += _private_kb(p)
            stack.extend(_children(p))
        except (OSError, ValueError):
            continue
    return total


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(int(c) for c in f.read().split())
    return out


def _vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _private_kb(pid: int) -> int:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def run_child(
    python,
    spec: dict,
    workdir: Path,
    label: str,
    env_extra: dict | None = None,
    cpu_affinity: set[int] | None = None,
    timeout: float | None = None,
) -> dict:
    """Run _task_runner.py in `python`; return its result plus rusage.

    Peak RSS ("maxrss_kb") is the larger of (a) the child's own VmHWM, which
    it reports itself at the end, and (b) the peak of the child's RSS plus the
    private memory of its descendants once its imports are done, sampled every
    20 ms from /proc (catches worker processes, if a task spawns any).
    wait4()'s ru_maxrss is kept as "ru_maxrss_kb" for reference only: on Linux
    it includes the parent's RSS at fork time, because the high-water mark
    survives exec.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{label}.spec.json"
    result_path = workdir / f"{label}.result.json"
    log_path = workdir / f"{label}.log"
    spec = dict(spec)
    spec.setdefault("sys_path", [str(BENCH_DIR)])
    spec_path.write_text(json.dumps(spec, indent=1))
    for stale in (result_path, Path(f"{result_path}.imported")):
        stale.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(env_extra or {})
    cmd = [str(python), str(RUNNER), str(spec_path), str(result_path)]
    if cpu_affinity:
        # taskset execs the interpreter, so the pid (and rusage) stay the same
        cmd = ["taskset", "-c", ",".join(str(c) for c in sorted(cpu_affinity))] + cmd
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(workdir),
            start_new_session=True,
        )
        tree_peak = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            imported = Path(f"{result_path}.imported").exists()
            tree_peak = max(tree_peak, _tree_rss_kb(proc.pid, imported))
            if timeout is not None and time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"error": f"child wrote no result (rc={proc.returncode})"}
    if timed_out:
        result["error"] = f"timed out after {timeout:.0f}s"
    result.update(
        label=label,
        cmd=cmd,
        returncode=proc.returncode,
        wall_seconds=wall,
        maxrss_kb=max(result.get("maxrss_end_kb") or 0, tree_peak),
        self_hwm_kb=result.get("maxrss_end_kb"),
        tree_sampled_peak_kb=tree_peak,
        ru_maxrss_kb=ru.ru_maxrss,
        cpu_seconds=ru.ru_utime + ru.ru_stime,
        log=str(log_path),
    )
    return result


def short_error(result: dict, lines: int = 3) -> str:
    err = result.get("error")
    if not err:
        return ""
    tail = [ln for ln in err.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(s.strip() for s in tail)


def warm_page_cache(path) -> float:
    """Read every file under path once so all contenders start warm."""
    t0 = time.perf_counter()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    while f.read(1 << 24):
                        pass
            except OSError:
                pass
    return time.perf_counter() - t0


def fmt_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(r):
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(r, widths, align, strict=True)
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join("---" for _ in headers) + "|")
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
