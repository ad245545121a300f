"""Put a finished directory in place of another, so that no reader sees half of either.

On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two directory entries in one
step: at every instant the destination path holds either the complete old image
or the complete new one, and the old one survives (under the new one's former
name) until it is deleted afterwards. Where the call is missing (other systems,
or file systems without support), the fallback renames the old directory aside
and the new one into place; a crash between the two renames leaves the old image
under its aside-name, which the next run of the task restores.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_ASIDE = ".replaced"


@functools.cache
def _renameat2():
    """The libc ``renameat2`` function, or None where it does not exist.

    Looked up once, in the libc already loaded into the process: resolving a
    library by name would run ``ldconfig`` in a subprocess on every call.
    """
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    function = _renameat2()
    if function is None:
        return False
    result = function(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_directory(new: Path, destination: Path) -> None:
    """Move the directory ``new`` to ``destination``, replacing what is there.

    The old content of ``destination`` is deleted only once the new one is in
    place. Without an atomic exchange, see the module docstring.
    """
    new, destination = Path(new), Path(destination)
    if not destination.exists():
        os.rename(new, destination)
        return
    if exchange(new, destination):
        shutil.rmtree(new)  # now holds the old content
        return
    logger.warning(
        "Atomic exchange unavailable here; replacing %s by two renames.", destination
    )
    aside = destination.with_name(destination.name + _ASIDE)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(destination, aside)
    os.rename(new, destination)
    shutil.rmtree(aside)


def recover(destination: Path) -> None:
    """Undo what a crash during the fallback replace can leave behind.

    If ``destination`` is missing but its aside-copy exists, the old content is
    moved back; a stale aside-copy next to a present destination is deleted.
    """
    destination = Path(destination)
    aside = destination.with_name(destination.name + _ASIDE)
    if not aside.exists():
        return
    if destination.exists():
        shutil.rmtree(aside)
    else:
        logger.warning("Restoring %s from an interrupted replace.", destination)
        os.rename(aside, destination)
