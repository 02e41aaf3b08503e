"""Working folders that a killed process cannot leave behind, the atomic swap, and children that die with us.

Every scratch folder (an export's hidden build beside its target, the fresh-process check's
``km-check-*`` folder) is held with an exclusive ``flock`` for as long as its maker works in
it. The kernel drops the lock when the maker dies, kill -9 included, so the next maker can
tell a stale folder (its lock is free) from one in use and remove it. Creating and sweeping
happen under a lock on the parent folder, so a sweeper never takes a folder between its
creation and its lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["ScratchDir", "locked", "sweep_stale", "exchange", "remove_tree", "die_with_parent"]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a folder (held for milliseconds: creating, sweeping, swapping in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_fd(path: Path, *, wait: bool) -> Optional[int]:
    """An open fd holding an exclusive flock on ``path``, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


class ScratchDir:
    """A new folder ``parent/PREFIXxxxx`` locked by this process until :meth:`release`."""

    def __init__(self, parent: Path, prefix: str) -> None:
        with locked(parent):
            sweep_stale(parent, prefix, already_locked=True)
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            self._fd = _lock_fd(self.path, wait=True)

    def hold(self, path: Path) -> None:
        """Also hold ``path`` (a folder about to get a scratch name: the previous export being removed)."""
        fd = _lock_fd(path, wait=True)
        if fd is not None:
            self._extra = getattr(self, "_extra", []) + [fd]

    def release(self) -> None:
        for fd in [self._fd, *getattr(self, "_extra", [])]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd, self._extra = None, []


def sweep_stale(parent: Path, prefix: str, *, already_locked: bool = False) -> list[Path]:
    """Remove folders ``parent/PREFIX*`` whose maker has gone (nobody holds their lock); returns them."""
    with contextlib.nullcontext() if already_locked else locked(parent):
        try:
            names = [n for n in os.listdir(parent) if n.startswith(prefix)]
        except OSError:
            return []
        removed = []
        for name in names:
            path = parent / name
            if path.is_symlink() or not path.is_dir():
                continue
            fd = _lock_fd(path, wait=False)
            if fd is None:
                continue  # in use (or not ours to open)
            try:
                if remove_tree(path):
                    removed.append(path)
            finally:
                os.close(fd)
        return removed


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): at no moment does either
    name point nowhere. False where the OS or the file system has no such call (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_tree(path: Path) -> bool:
    """Delete a folder, read-only parts included; True when it is gone."""
    raced = []

    def make_writable(function, failed, exc) -> None:
        error = exc[1] if isinstance(exc, tuple) else exc
        if isinstance(error, FileNotFoundError):
            return  # gone meanwhile: another sweep, or its maker cleaning up, took it first
        if getattr(error, "errno", None) == errno.ENOTEMPTY:
            raced.append(failed)  # something added a file while the folder was emptied
        parent = os.path.dirname(failed)
        for p in (parent, failed):
            with contextlib.suppress(OSError):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
        if function in (os.rmdir, os.unlink, os.remove):  # (os.open and os.scandir take more than the path, and
            with contextlib.suppress(OSError):           # remove nothing: the second pass below takes that part)
                function(failed)

    if not path.exists() and not path.is_symlink():
        return True
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable)
    else:
        shutil.rmtree(path, onerror=lambda f, p, e: make_writable(f, p, e))
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    for _ in range(5 if raced else 0):
        if not path.exists():
            return True
        # A process still writing there (a killed command's Ray agents log for a minute before they exit) added a
        # file while the folder was emptied: its rmdir failed, and another pass takes what came since.
        time.sleep(0.05)
        shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def die_with_parent(parent_pid: Optional[int], sig: int = signal.SIGKILL,
                    orphaned: Optional[Callable[[], None]] = None) -> None:
    """In a child process: get ``sig`` (killed, by default) when ``parent_pid`` dies (Linux
    ``PR_SET_PDEATHSIG``), and exit at once if it is already gone (``orphaned`` instead, when given: what to
    clean up first). Elsewhere this does nothing. (Linux sends the signal when the parent *thread* that
    started the child ends: start such a child from a thread that lives as long as the parent needs it.)"""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        if orphaned is not None:
            orphaned()
        os._exit(1)
