"""How many threads a task may use."""

import os


def available_cpus() -> int:
    """CPUs this process may run on (honours SLURM's and cgroup's CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
