"""The apply executable gives freed image buffers back to the system at once.

The tuning is process-wide, so only the executable does it: the task function,
called from Python, leaves the caller's allocator as it was.
"""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MEASURE = textwrap.dedent(
    """
    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def kept_kib():
        big = bytearray(16 << 20)  # freeing it raises glibc's mmap threshold
        del big
        before = rss_kib()
        chunk = bytearray(8 << 20)
        chunk[:] = b"x" * len(chunk)  # touch every page
        del chunk
        return rss_kib() - before
    """
)

PROBES = {
    "default": "print(kept_kib())",
    "fixed": textwrap.dedent(
        """
        from fractal_tasks.writer.memory import return_freed_memory

        assert return_freed_memory()
        print(kept_kib())
        """
    ),
    # the task function, called from Python on a small plate
    "function": textwrap.dedent(
        """
        import sys, tempfile
        sys.path.insert(0, sys.argv[1])
        from _workflow import register
        from fractal_tasks.tools.synthetic import build_synthetic_plate

        plate = build_synthetic_plate(
            tempfile.mkdtemp() + "/p.zarr", wells=("B03",), n_acquisitions=2,
            fovs=(1, 2), fov_shape=(64, 80), levels=2, labels=False,
        )
        register(plate, apply_args={"overwrite_input": False})
        print(kept_kib())
        """
    ),
    # the executable, as Fractal runs it: measured where the task would run
    "executable": textwrap.dedent(
        """
        import runpy
        import fractal_task_tools.task_wrapper as wrapper

        wrapper.run_fractal_task = lambda task_function: print(kept_kib())
        runpy.run_module(
            "fractal_tasks.apply_registration_to_image", run_name="__main__"
        )
        """
    ),
}


def _kept_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE + PROBES[mode], str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only",
)


@glibc_only
def test_freed_chunk_buffer_leaves_the_process():
    # Without the fix glibc keeps the 8 MiB buffer in its heap after the free;
    # with it the buffer had its own mapping and is gone.
    assert _kept_kib("default") > 4 * 1024
    assert _kept_kib("fixed") < 1024


@glibc_only
def test_only_the_executable_tunes_the_allocator():
    assert _kept_kib("executable") < 1024
    assert _kept_kib("function") > 4 * 1024
