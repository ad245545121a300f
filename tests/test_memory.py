"""The apply task gives freed image buffers back to the system at once."""

import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys
    from fractal_tasks._memory import return_freed_memory

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    big = bytearray(16 << 20)  # freeing it raises glibc's mmap threshold
    del big
    if sys.argv[1] == "fixed":
        assert return_freed_memory()
    before = rss_kib()
    chunk = bytearray(8 << 20)
    chunk[:] = b"x" * len(chunk)  # touch every page
    del chunk
    print(rss_kib() - before)
    """
)


def _kept_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only",
)
def test_freed_chunk_buffer_leaves_the_process():
    # Without the fix glibc keeps the 8 MiB buffer in its heap after the free;
    # with it the buffer had its own mapping and is gone.
    assert _kept_kib("default") > 4 * 1024
    assert _kept_kib("fixed") < 1024
