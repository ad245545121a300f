"""Fractal task list: the source of `__FRACTAL_MANIFEST__.json`.

Regenerate the manifest after changing a task's signature or docstring:
`fractal-manifest create --package fractal_tasks` (CI runs `fractal-manifest
check`).
"""

from fractal_task_tools.task_models import CompoundTask, ParallelTask

AUTHORS = "fractal-tasks registration team"
DOCS_LINK = None
TAGS = ["Multiplexing", "Registration", "2D", "3D"]

TASK_LIST = [
    CompoundTask(
        name="Calculate Registration (image-based)",
        executable_init="init_calculate_registration.py",
        executable="calculate_registration.py",
        meta_init={"cpus_per_task": 1, "mem": 1000},
        meta={"cpus_per_task": 2, "mem": 4000},
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
        meta={"cpus_per_task": 2, "mem": 2000},
        category="Registration",
        modality="HCS",
        tags=TAGS,
        docs_info="file:task_info/apply_registration_to_image.md",
    ),
]
