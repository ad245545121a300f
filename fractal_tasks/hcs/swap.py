"""Put a finished directory in place of another, so that no reader sees half of either.

On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two directory entries in one
step. File systems without it (NFS, Lustre, GPFS, CephFS, FUSE mounts) get two
renames instead: the old directory aside (``<name>.replaced``), the new one into
place. Between the two there is no directory at the path.

Readers of this package see neither that gap nor a directory half replaced: the
renames run under an exclusive ``fcntl`` lock on a small file next to the
directory (``.<name>.lock``), and readers hold the same lock shared while they
read (``reading``). The lock is held for the renames only, never while the old
directory is deleted. The lock file stays where it is: deleting it while another
process waits on it would let two processes hold "the" lock at once.

A crash between the two renames leaves the old directory under its aside-name;
the next reader or run of the task restores it (``recover``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_ASIDE = ".replaced"
LOCK_SUFFIX = ".lock"
METADATA_LOCK = ".metadata.lock"


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


def lock_file(directory: Path) -> Path:
    """The lock file of ``directory``: ``.<name>.lock`` beside it, never inside.

    The directory itself is what gets renamed, so its lock cannot live in it.
    """
    directory = Path(directory)
    return directory.with_name(f".{directory.name}{LOCK_SUFFIX}")


def _aside(directory: Path) -> Path:
    return directory.with_name(directory.name + _ASIDE)


@functools.cache
def _log_fallback_once() -> None:
    # normal on shared file systems, so not a warning (Fractal flags those)
    logger.info(
        "Atomic exchange unavailable on this file system; replacing by two "
        "renames under a lock."
    )


def replace_directory(new: Path, destination: Path) -> None:
    """Move the directory ``new`` to ``destination``, replacing what is there.

    The swap runs under the exclusive lock of ``destination``, so it waits for
    readers inside ``reading(destination)`` and they for it (milliseconds). The
    old content is deleted after the lock is released, once the new one is in
    place. Must not be called inside ``reading(destination)`` (it would wait
    for itself).
    """
    new, destination = Path(new), Path(destination)
    with _locked(lock_file(destination), exclusive=True):
        if not destination.exists():
            os.rename(new, destination)
            return
        if exchange(new, destination):
            old = new  # now holds the old content
        else:
            _log_fallback_once()
            old = _aside(destination)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(destination, old)
            os.rename(new, destination)
    shutil.rmtree(old)


def recover(destination: Path) -> None:
    """Undo what a crash during the fallback replace can leave behind.

    If ``destination`` is missing but its aside-copy exists, the old content is
    moved back; a stale aside-copy next to a present destination is deleted.
    Only the run that owns ``destination`` (the one that replaces it) may call
    this: the deletion would race with that run's own deletion of the aside.
    """
    destination = Path(destination)
    with _locked(lock_file(destination), exclusive=True):
        _restore(destination)
    if destination.exists():
        shutil.rmtree(_aside(destination), ignore_errors=True)


def _restore(destination: Path) -> None:
    """Move the aside-copy back if ``destination`` is missing; under the lock."""
    aside = _aside(destination)
    if not destination.exists() and aside.exists():
        # INFO: the killed run was the one with a problem, and reported it
        logger.info("Restoring %s from an interrupted replace.", destination)
        os.rename(aside, destination)


@contextlib.contextmanager
def reading(directory: Path) -> Iterator[None]:
    """Keep ``directory`` from being replaced while the block reads it.

    Holds the lock of ``directory`` shared: any number of readers at once, and
    no ``replace_directory`` meanwhile. If a replace was killed between its two
    renames (``directory`` missing, its aside-copy present), the old content is
    restored first, under the exclusive lock. A directory that is simply
    missing stays missing: the block's own reads report it.

    Raises:
        OSError: If the lock file cannot be created or locked (e.g. no write
            permission on the parent folder), as the system reports it.
    """
    directory = Path(directory)
    lock = lock_file(directory)
    while True:
        with _locked(lock, exclusive=False):
            if directory.exists() or not _aside(directory).exists():
                yield
                return
        with _locked(lock, exclusive=True):
            _restore(directory)


@contextlib.contextmanager
def updating(folder: Path) -> Iterator[None]:
    """Let one process at a time change what ``folder`` holds.

    Holds ``<folder>/.metadata.lock`` exclusive, for changes that several runs
    make to one shared folder, such as the images of a plate and its
    consolidated metadata: a refresh that another run's replace overtakes
    would leave the consolidated metadata stale.
    """
    with _locked(Path(folder) / METADATA_LOCK, exclusive=True):
        yield


@dataclass
class _Hold:
    """This process's hold on one lock file.

    ``fcntl`` locks belong to a process, not to a thread or a file descriptor:
    a second lock by the same process never waits, and closing any descriptor
    of the file drops them all. So the threads of one process share a single
    descriptor per lock file, and wait for each other here.
    """

    changed: threading.Condition = field(default_factory=threading.Condition)
    readers: int = 0
    writing: bool = False
    fd: int | None = None


_HOLDS: dict[str, _Hold] = {}
_HOLDS_GUARD = threading.Lock()


def _forget_holds() -> None:
    """In a forked child, which holds none of its parent's ``fcntl`` locks."""
    global _HOLDS_GUARD
    _HOLDS_GUARD = threading.Lock()
    _HOLDS.clear()


os.register_at_fork(after_in_child=_forget_holds)


@contextlib.contextmanager
def _locked(lock: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``lock`` shared or exclusive, against other threads and processes.

    Blocks until granted, with no timeout: the exclusive lock is held for a
    few renames only, and the system releases the locks of a killed process.
    """
    key = os.path.realpath(lock)
    with _HOLDS_GUARD:
        hold = _HOLDS.setdefault(key, _Hold())
    with hold.changed:
        hold.changed.wait_for(
            lambda: not hold.writing and not (exclusive and hold.readers)
        )
        if hold.fd is None:
            # readers need read access only, so a lock file made by another
            # user who shares the folder still serves them
            flags = (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT
            fd = os.open(key, flags, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            hold.fd = fd
        if exclusive:
            hold.writing = True
        else:
            hold.readers += 1
    try:
        yield
    finally:
        with hold.changed:
            if exclusive:
                hold.writing = False
            else:
                hold.readers -= 1
            if not hold.readers and hold.fd is not None:
                os.close(hold.fd)  # releases the fcntl lock
                hold.fd = None
            hold.changed.notify_all()
