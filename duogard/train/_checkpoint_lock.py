"""The writer lock of a checkpoint directory: one writer at a time; readers never take it.

The lock is an advisory ``fcntl.flock`` on ``<directory>/.duogard-lock``, a file that is
created once and never removed (removing a lock file lets two writers lock two different
files). The holder writes ``{"pid", "host", "since", "argv"}`` into it, so that a second
writer's :class:`CheckpointLockedError` can say who holds the directory. The kernel drops
a flock when its holder exits, however it exits (SIGKILL included), so a crashed run never
leaves a stale lock behind; a forked child closes its copy of the descriptor, so a data
loader's workers do not keep their parent's lock after it is released. Within one process
a registry refuses a second holder of the same directory too (flock alone would allow it
on file systems that emulate it with per-process POSIX locks, such as NFS).

The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and must be a
regular file with one link: a link planted in a shared checkpoint directory would otherwise
make the writer truncate its target (any file the user can write), or create a file where a
dangling one points. Such a directory is refused with a :class:`CheckpointError` naming it.

Where ``fcntl`` does not exist (Windows) or the file system refuses locks (``ENOLCK``,
``EOPNOTSUPP``), writers are not locked against each other across processes: the registry
still guards one process, and keeping to one writer per directory is up to the user.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

from duogard.train._checkpoint_format import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["CheckpointLockedError", "DirectoryLock", "LOCK_NAME", "open_no_follow"]

#: The lock file's name inside a checkpoint directory.
LOCK_NAME = ".duogard-lock"

_GUARD = threading.RLock()  # reentrant: a lock collected inside acquire() releases itself
# realpath of a directory -> this process's lock on it (weak: a lock nobody keeps is released)
_HELD: weakref.WeakValueDictionary[str, DirectoryLock] = weakref.WeakValueDictionary()


def _forget_in_child() -> None:
    """A forked child (a data loader's worker) does not hold its parent's locks.

    It inherits the descriptors, and a flock lasts while any descriptor of it is open: the
    child closes its copies (without unlocking, which would unlock the parent too).
    """
    global _GUARD
    _GUARD = threading.RLock()  # another thread may have held it at the fork
    for lock in list(_HELD.values()):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class CheckpointLockedError(RuntimeError):
    """Another writer (a process, or a Checkpointer of this one) holds the checkpoint directory.

    Attributes:
        directory: the checkpoint directory.
        holder: what the holder wrote into the lock file (``pid``, ``host``, ``since``,
            ``argv``), or None when it could not be read (the holder had not written it yet).
    """

    def __init__(self, directory: str | os.PathLike, holder: dict | None):
        self.directory, self.holder = Path(directory), holder
        if holder:
            own = " (this process)" if holder.get("pid") == os.getpid() else ""
            who = (
                f"pid {holder.get('pid')}{own} on host {holder.get('host')}, since "
                f"{holder.get('since')} (command: {holder.get('argv') or '?'})"
            )
        else:
            who = f"a process that has not written its details into {self.directory / LOCK_NAME} yet"
        super().__init__(
            f"checkpoint directory {self.directory} is being written by another writer: {who}. "
            f"One writer per checkpoint directory: wait for that run to end, stop it, or write "
            f"to another directory (loading a checkpoint needs no lock)"
        )


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under the name must not block the open


def open_no_follow(path: Path, flags: int, what: str, *, single_link: bool = True, mode: int = 0o666) -> int:
    """``os.open`` of a file in a checkpoint directory that refuses anything but a regular file.

    The last component is never followed when it is a symbolic link (``O_NOFOLLOW``), and
    the opened file must be a regular file (a link to ``/dev/zero`` or a FIFO would make a
    reader read forever) with, when ``single_link``, one link only (a hard link planted in a
    shared directory is, for a writer, the same trap as a symbolic one).

    Raises:
        CheckpointError: ``path`` is a symbolic link, a hard link, or not a regular file.
    """

    def refuse(kind: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint: {path} is {kind}, not a regular file; refusing to {what} through it "
            f"(a link planted in a checkpoint directory could make duogard overwrite or read "
            f"another file). Remove it if you did not make it"
        )

    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (os.path.islink(path) and exc.errno != errno.ENOENT):
            raise refuse("a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("a special file")
        if single_link and info.st_nlink > 1:
            raise refuse(f"a file with {info.st_nlink} hard links")
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder_of(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        holder = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _try_flock(fd: int, path: Path) -> bool | None:
    """True: locked; False: someone else holds it; None: this system cannot lock it."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # pragma: no cover - a file system without locks
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
        warnings.warn(
            f"checkpoint: {path.parent} is on a file system that cannot lock {path.name} "
            f"({exc.strerror}); writers there are not locked against each other",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return True


class DirectoryLock:
    """The exclusive writer lock of one checkpoint directory (which must exist).

    ``acquire()`` never waits: it raises :class:`CheckpointLockedError` naming the holder.
    Also a context manager. ``release()`` is idempotent; closing the process releases too.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.holder: dict | None = None
        self.exclusive = False  # True when an OS lock backs it (False: this process only)
        self._fd: int | None = None
        self._key = os.path.realpath(self.directory)

    @property
    def held(self) -> bool:
        """Whether this object holds the directory now."""
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        path = self.directory / LOCK_NAME
        with _GUARD:
            if self.held:
                return self
            other = _HELD.get(self._key)
            if other is not None:
                raise CheckpointLockedError(self.directory, other.holder)
            fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, "lock the directory")
            try:
                locked = _try_flock(fd, path)
                if locked is False:
                    raise CheckpointLockedError(self.directory, _holder_of(fd))
                holder = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "argv": " ".join(sys.argv)[:300],
                }
                data = json.dumps(holder).encode("utf-8")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, data)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.holder, self.exclusive = fd, holder, bool(locked)
            _HELD[self._key] = self
        return self

    def release(self) -> None:
        with _GUARD:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
            try:
                os.ftruncate(fd, 0)  # the next contender must not read our details as its holder's
            except OSError:  # pragma: no cover
                pass
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock dropped without release() (the descriptor would keep the flock)
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
