"""SLURM-side checks of the fractal-server SLURM e2e test.

Imported by ``.ci/fractal_server_e2e.py`` (``--backend slurm``). It reads:

- the job folder that fractal-server keeps (one subfolder per workflow task,
  with each SLURM job's submission script, its stdout/stderr and the per-task
  input/args files);
- ``steps.log``, written by the cluster's TaskProlog/TaskEpilog
  (``.ci/slurm/cluster.sh``): one line per task of each job step with
  ``SLURM_CPUS_PER_TASK`` and the CPU affinity the step's process got, and one
  line when it ended;
- ``jobcomp.log``, SLURM's job-completion records (``jobcomp/filetxt``:
  there is no slurmdbd, hence no ``sacct``).

The tasks size their thread pools with ``len(os.sched_getaffinity(0))``
(``fractal_tasks.hcs.cpus.available_cpus``), so "the affinity of each step
equals the CPUs requested for it" is "each task used the CPUs SLURM gave it".
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    """One job step as seen by the TaskProlog/TaskEpilog."""

    job: str
    step: str
    cpus_per_task: str
    allowed: set[int]
    start: float
    end: float | None = None


@dataclass
class SlurmJob:
    """One SLURM job submitted by fractal-server, from its job folder."""

    job_id: str
    task_name: str
    part: str  # "par" (parallel part) or "non_par"
    script: Path
    ntasks: int
    cpus_per_task: int
    zarr_urls: list[str] = field(default_factory=list)
    n_srun: int = 0


def cpu_list(text: str) -> set[int]:
    """Parse a Linux CPU list such as ``0-1,3``."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return out


def parse_steps(path: Path) -> dict[tuple[str, str], Step]:
    """(job id, step id) -> Step, for real steps (the batch script is skipped)."""
    steps: dict[tuple[str, str], Step] = {}
    ends: dict[tuple[str, str], float] = {}
    for line in path.read_text().splitlines():
        kv = dict(item.split("=", 1) for item in line.split() if "=" in item)
        key = (kv.get("job", ""), kv.get("step", ""))
        if not key[1] or key[1] == "batch":
            continue
        if "start" in kv:
            steps[key] = Step(
                job=key[0],
                step=key[1],
                cpus_per_task=kv.get("cpus_per_task", "unset"),
                allowed=cpu_list(kv.get("allowed", "")),
                start=float(kv["start"]),
            )
        elif "end" in kv:
            ends[key] = float(kv["end"])
    for key, end in ends.items():
        if key in steps:
            steps[key].end = end
    return steps


def parse_jobcomp(path: Path) -> dict[str, dict[str, str]]:
    """SLURM job id -> its completion record (``jobcomp/filetxt``)."""
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        kv = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobId" in kv:
            out[kv["JobId"]] = kv
    return out


def parse_job_folder(job_dir: Path) -> list[SlurmJob]:
    """Every SLURM job fractal-server submitted for this Fractal job."""
    jobs = []
    for script in sorted(job_dir.glob("*/*-slurm-submit.sh")):
        prefix = script.name[: -len("-slurm-submit.sh")]
        text = script.read_text()
        opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
        outs = sorted(script.parent.glob(f"{prefix}-slurm-*.out"))
        job_id = outs[0].name[len(prefix) + len("-slurm-") : -len(".out")] if outs else "?"
        job = SlurmJob(
            job_id=job_id,
            task_name=opts.get("job-name", "?").replace("_", " "),
            part="par" if prefix.startswith("par") else "non_par",
            script=script,
            ntasks=int(opts.get("ntasks", "0")),
            cpus_per_task=int(opts.get("cpus-per-task", "0")),
        )
        for line in text.splitlines():
            if not line.startswith("srun "):
                continue
            job.n_srun += 1
            words = shlex.split(line.rstrip("&"))
            # the server deletes the input files; the args file of the same
            # component (what the task got) stays in the local folder
            input_name = Path(words[words.index("--input-file") + 1]).name
            args_file = script.parent / input_name.replace("-input.json", "-args.json")
            args = json.loads(args_file.read_text()) if args_file.exists() else {}
            if "zarr_url" in args:
                job.zarr_urls.append(args["zarr_url"])
        jobs.append(job)
    return jobs


def max_overlap(steps: list[Step]) -> int:
    """Largest number of steps running at one instant."""
    events = []
    for s in steps:
        if s.end is None:
            continue
        events.append((s.start, 1))
        events.append((s.end, -1))
    best = cur = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        cur += delta
        best = max(best, cur)
    return best


def run_checks(
    *,
    job_dir: Path,
    steps_log: Path,
    jobcomp_log: Path,
    expected_meta: dict[str, dict],
    well_of: dict[str, str],
    say: Callable[[str], None],
) -> Iterator[tuple[bool, str]]:
    """Yield (ok, description) for every check."""
    steps = parse_steps(steps_log)
    jobcomp = parse_jobcomp(jobcomp_log)
    jobs = parse_job_folder(job_dir)
    yield bool(jobs), f"the job folder lists SLURM jobs ({len(jobs)})"
    by_job: dict[str, list[Step]] = {}
    for s in steps.values():
        by_job.setdefault(s.job, []).append(s)

    for job in jobs:
        mine = sorted(by_job.get(job.job_id, []), key=lambda s: int(s.step))
        label = f"SLURM job {job.job_id} ({job.task_name}, {job.part}, {job.n_srun} task(s))"
        say(
            f"{label}: ntasks={job.ntasks} cpus-per-task={job.cpus_per_task}; steps: "
            + ", ".join(
                f"{s.step}: SLURM_CPUS_PER_TASK={s.cpus_per_task} "
                f"affinity={sorted(s.allowed)} {((s.end or s.start) - s.start):.1f}s"
                for s in mine
            )
        )
        yield len(mine) == job.n_srun, f"{label}: one step per task ({len(mine)})"
        bad = [
            s.step
            for s in mine
            if s.cpus_per_task != str(job.cpus_per_task) or len(s.allowed) != job.cpus_per_task
        ]
        yield (
            not bad,
            f"{label}: every step has SLURM_CPUS_PER_TASK = CPU affinity size = "
            f"{job.cpus_per_task}" + (f" (not steps {bad})" if bad else ""),
        )
        rec = jobcomp.get(job.job_id)
        if rec is None:
            yield False, f"{label}: has a job-completion record"
        else:
            yield (
                rec.get("JobState") == "COMPLETED"
                and rec.get("ProcCnt") == str(job.ntasks * job.cpus_per_task),
                f"{label}: accounting says {rec.get('JobState')}, ProcCnt={rec.get('ProcCnt')} "
                f"(expected COMPLETED, {job.ntasks * job.cpus_per_task})",
            )
        # steps running together never share a CPU
        overlap = max_overlap(mine)
        clash = [
            (a.step, b.step)
            for i, a in enumerate(mine)
            for b in mine[i + 1 :]
            if a.end and b.end and a.start < b.end and b.start < a.end and a.allowed & b.allowed
        ]
        yield not clash, f"{label}: concurrent steps have disjoint CPUs" + (
            f" (clash: {clash})" if clash else ""
        )
        meta = expected_meta.get(job.task_name)
        if meta is None or job.part != "par":
            continue
        yield (
            job.cpus_per_task == meta["cpus_per_task"],
            f"{label}: --cpus-per-task={job.cpus_per_task} as in the task meta "
            f"({meta['cpus_per_task']})",
        )
        yield (
            job.n_srun <= meta["tasks_per_job"],
            f"{label}: at most tasks_per_job={meta['tasks_per_job']} tasks",
        )
        par = min(job.n_srun, meta["parallel_tasks_per_job"])
        yield (
            job.ntasks == par,
            f"{label}: --ntasks={job.ntasks} = min(tasks, parallel_tasks_per_job) = {par}",
        )
        if par > 1:
            yield (
                overlap == par,
                f"{label}: {par} tasks ran at the same time (max overlap {overlap})",
            )

    # Apply-like tasks batched by well: each job holds exactly one well's images
    for name, meta in expected_meta.items():
        mine = [j for j in jobs if j.task_name == name and j.part == "par"]
        if not mine:
            yield False, f"{name}: ran in SLURM jobs"
            continue
        urls = [u for j in mine for u in j.zarr_urls]
        say(
            f"{name}: {len(urls)} task(s) in {len(mine)} SLURM job(s): "
            + "; ".join(
                f"job {j.job_id}: "
                + ", ".join(sorted({well_of.get(u, '?') for u in j.zarr_urls}))
                for j in mine
            )
        )
        yield len(urls) == len(set(urls)), f"{name}: every image ran once"
        per_well: dict[str, int] = {}
        for w in well_of.values():
            per_well[w] = per_well.get(w, 0) + 1
        if set(per_well.values()) == {meta.get("tasks_per_job")}:
            mixed = [j.job_id for j in mine if len({well_of.get(u) for u in j.zarr_urls}) != 1]
            yield (
                not mixed and len(mine) == len(per_well),
                f"{name}: one SLURM job per well, holding all of that well's images"
                + (f" (mixed: jobs {mixed})" if mixed else ""),
            )
        if meta.get("tasks_per_job", 1) > 1:
            yield (
                any(j.n_srun > 1 for j in mine),
                f"{name}: several tasks batched in one SLURM job",
            )
