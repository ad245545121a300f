"""How each task module runs as Fractal's executable (its ``__main__`` block)."""

import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def run_as_executable(task_function: Callable[..., Any]) -> None:
    """Run a task as Fractal runs it, then end the process at once.

    fractal-task-tools' wrapper reads ``--args-json``, calls the task and
    writes ``--out-json``. After a success nothing is left to do but the
    interpreter's teardown, which, with ngio's imports loaded, takes 0.3-0.7 s
    (``benchmarks/bench_fixed_cost.py``, column "exit"): a plate of 384 wells
    x 20 cycles pays it some 15,000 times. So the logs and streams are flushed
    and the process ends there. A failing task raises, and the process ends
    as usual, with its traceback and a non-zero code. Only for the process of
    an executable: a task function called from Python never gets here.
    """
    from fractal_task_tools.task_wrapper import run_fractal_task

    run_fractal_task(task_function=task_function)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
