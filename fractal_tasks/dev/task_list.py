"""Fractal task list: the source of `__FRACTAL_MANIFEST__.json`.

Regenerate the manifest after changing a task's signature or docstring:
`fractal-manifest create --package fractal_tasks` (CI runs `fractal-manifest
check`).
"""

from fractal_task_tools.task_models import CompoundTask, ParallelTask

# meta (cpus_per_task, mem in MB = MiB for SLURM) per part, from the peaks of
# benchmarks/bench_fractal_server.py on a 4-well x 4-cycle x 3x3-FOV plate of
# 2160x2560 px (2D, registration at level 2) under SLURM: mem = max peak RSS
# x 1.25 rounded up to 250 MB, at least 1000 MB (peaks: 278-420 MiB);
# cpus_per_task = ceil(CPU s / wall s - 0.25), at least 1 (all parts < 1.0).
# See benchmarks/README.md.

AUTHORS = "fractal-tasks registration team"
DOCS_LINK = None
TAGS = ["Multiplexing", "Registration", "2D", "3D"]

TASK_LIST = [
    CompoundTask(
        name="Calculate Registration (image-based)",
        executable_init="init_calculate_registration.py",
        executable="calculate_registration.py",
        meta_init={"cpus_per_task": 1, "mem": 1000},
        meta={"cpus_per_task": 1, "mem": 1000},
        category="Registration",
        modality="HCS",
        tags=TAGS,
        docs_info="file:task_info/calculate_registration.md",
    ),
    CompoundTask(
        name="Find Registration Consensus",
        executable_init="init_find_consensus.py",
        executable="find_consensus.py",
        meta_init={"cpus_per_task": 1, "mem": 1000},
        meta={"cpus_per_task": 1, "mem": 1000},
        category="Registration",
        modality="HCS",
        tags=TAGS,
        docs_info="file:task_info/find_consensus.md",
    ),
    ParallelTask(
        name="Apply Registration to Image",
        executable="apply_registration_to_image.py",
        input_types={"registered": False},
        output_types={"registered": True},
        meta={"cpus_per_task": 1, "mem": 1000},
        category="Registration",
        modality="HCS",
        tags=TAGS,
        docs_info="file:task_info/apply_registration_to_image.md",
    ),
]
