"""Output paths, checked before any work starts, and written at the end without losing the run.

A path that cannot be written (a file where a directory is wanted, a read-only directory, a
missing permission) is a :class:`UsageError` before the first step, not a traceback after the
last one. Devices and pipes (``/dev/stdout``, ``/dev/full``) are only opened at the end: a
failure then (``/dev/full``: no space left) is said in one line by :func:`write_text`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from duogard.cli._errors import OutputError, UsageError

__all__ = [
    "check_output_file",
    "check_output_dir",
    "check_resume",
    "check_names",
    "write_text",
    "output_error",
]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


#: The longest file or directory name (bytes) where the file system does not say (Linux's NAME_MAX).
NAME_MAX = 255


def _name_max(path: Path) -> int:
    """The longest name the file system of ``path``'s nearest existing ancestor allows."""
    for ancestor in (path.absolute(), *path.absolute().parents):
        try:
            if ancestor.is_dir():
                return os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no limit
            break
    return NAME_MAX


def check_names(path, flag: str) -> None:
    """Refuse, as a usage error naming ``flag``, a path with a name longer than the file system allows
    (it would fail only when the file is written, after the run).
    """
    path = Path(path)
    limit = _name_max(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise UsageError(
                f"{flag} {path}: the name {part[:24]}... is {size} bytes, longer than the {limit} this "
                "file system allows"
            )


def _make_dir(path: Path, flag: str, given: Path | None = None) -> None:
    """Create ``path``, the directory of ``flag``'s value ``given`` (default: ``path`` itself)."""
    name = f"{flag} {given or path}: " + ("" if given is None else f"its directory {path} ")
    if path.exists() and not path.is_dir():
        raise UsageError(name + "exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an ancestor is a file, or not writable
        raise UsageError(name + f"cannot be created: {_reason(exc)}") from None


def _probe_dir(path: Path, flag: str, given: Path | None = None) -> None:
    """Create and remove a file in ``path``: the one sure test that files can be made there."""
    name = f"{flag} {given or path}: cannot write in " + ("this directory" if given is None else f"{path}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".duogard-probe-", dir=path)
    except OSError as exc:
        raise UsageError(f"{name}: {_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path, flag: str) -> Path:
    """The directory ``path`` (created with its parents) after checking files can be written in it.

    Raises:
        UsageError: it is a file, sits under one, or cannot be created or written in.
    """
    path = Path(path)
    check_names(path, flag)
    _make_dir(path, flag)
    _probe_dir(path, flag)
    return path


def check_output_file(path, flag: str) -> Path:
    """Check the file ``path`` can be written (its directory is created); nothing is left behind.

    An existing regular file is opened for append (unchanged); a new one is probed in its
    directory; a device or pipe is only checked for write permission (opening a pipe could block).

    Raises:
        UsageError: it is a directory, its directory cannot be made or written, or it is read-only.
    """
    path = Path(path)
    check_names(path, flag)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    _make_dir(path.parent, flag, path)
    if not path.exists():
        _probe_dir(path.parent, flag, path)
    elif path.is_file():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot write this file: {_reason(exc)}") from None
    elif not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write: permission denied")
    return path


def check_resume(path, flag: str = "--resume") -> None:
    """``path`` holds a checkpoint (a directory with its manifest, or the manifest itself)."""
    from duogard.train.checkpoint import MANIFEST

    p = Path(path)
    check_names(p, flag)
    if p.is_file() and p.name == MANIFEST:
        return
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such checkpoint directory")
    if not (p / MANIFEST).is_file():
        raise UsageError(f"{flag} {path}: not a duogard checkpoint (no {MANIFEST} in it)")


def write_text(path, text: str, flag: str, *, note: str = "") -> None:
    """Write ``text`` to ``path``; an OS error becomes an :class:`OutputError` naming the flag."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise output_error(exc, flag, path, note=note) from exc


def output_error(exc: OSError, flag: str, path, *, note: str = "") -> OutputError:
    """``exc`` (raised while writing ``path`` of ``flag``) as an :class:`OutputError`."""
    return OutputError(f"could not write {flag} {path}: {_reason(exc)}" + (f" ({note})" if note else ""))
