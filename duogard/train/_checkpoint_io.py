"""The files of a checkpoint directory: the crash-safe commit, the garbage, the reader's retry.

The order of a save (checked by the tests): the tensor file is written to a temporary
file and fsynced, renamed to its own new name, and the directory fsynced; the manifest
is written to a temporary file and fsynced, renamed over ``checkpoint.json`` (the commit
point), and the directory fsynced; then old files are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import numpy as np

from duogard.train._checkpoint_format import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    check_manifest,
    check_tensors,
    decode_tensors,
)
from duogard.train._checkpoint_lock import open_no_follow

_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22
_READ_ATTEMPTS = 20  # a reader re-reads the manifest this often when its tensor file goes away


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    """The bytes of a regular file of a checkpoint directory (a symbolic link is refused)."""
    fd = open_no_follow(path, os.O_RDONLY, "read", single_link=False)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(directory: Path) -> Path:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"save_checkpoint: {directory} exists and is not a directory "
            f"(a checkpoint is a directory holding {MANIFEST} and its tensors)"
        )
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
    return directory


def committed_tensor_file(directory: Path) -> str | None:
    """The tensor file the current manifest names (None: no manifest, or not a readable one)."""
    return _committed(directory)[0]


def _committed(directory: Path) -> tuple[str | None, int | None]:
    """``(tensor file, step)`` of the current manifest (None for what it does not say readably)."""
    try:
        manifest = json.loads(read_file(directory / MANIFEST))
        name, step = manifest["tensors"]["file"], manifest["step"]
    except (OSError, ValueError, TypeError, KeyError):
        return None, None
    return (name if isinstance(name, str) else None), (step if type(step) is int else None)


def commit(directory: Path, blob: bytes, manifest: dict, step: int, *, exclusive: bool = True) -> Path:
    """Write the tensor file and then the manifest (the commit point); the caller holds the lock.

    ``exclusive``: the lock keeps other processes out, so temporaries of others are stale.

    Raises:
        CheckpointWriteError: the file system refused a write (a full disk); the files of this
            save are removed and the previous checkpoint stands (the message says so).
    """
    token = secrets.token_hex(4)
    tensor_name = f"tensors-{step:08d}-{token}.safetensors"
    manifest["tensors"] = {
        "file": tensor_name,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    previous, previous_step = _committed(directory)
    own_tmp = f"{_TMP_PREFIX}{os.getpid()}-{token}-"
    committed = False
    try:
        tmp = directory / f"{own_tmp}{tensor_name}"
        write_file(tmp, blob)
        os.replace(tmp, directory / tensor_name)
        fsync_dir(directory)  # the tensor file's name is durable before a manifest names it

        tmp = directory / f"{own_tmp}{MANIFEST}"
        write_file(tmp, json.dumps(manifest, indent=1).encode("utf-8"))
        os.replace(tmp, directory / MANIFEST)  # the commit point
        committed = True
        fsync_dir(directory)
    except OSError as exc:
        if committed:  # only the directory's fsync failed: the new checkpoint is the current one
            raise
        for name in (f"{own_tmp}{tensor_name}", f"{own_tmp}{MANIFEST}", tensor_name):
            _remove(directory / name)  # free the space this save took; nothing names these files
        before = (
            f"the previous checkpoint (step {previous_step}) is intact"
            if previous_step is not None
            else "no earlier checkpoint is there"
        )
        reason = exc.strerror or str(exc)
        raise CheckpointWriteError(
            f"save_checkpoint: could not write the checkpoint of step {step} in {directory}: {reason}; "
            f"{before}, and the partial files of this save were removed",
            errno=exc.errno,
            step=step,
            previous_step=previous_step,
            directory=directory,
        ) from exc

    # Garbage: tensor files older than the previous checkpoint's (a reader that read the
    # previous manifest may still be opening that one), and temporaries left by crashed
    # writers (when the lock says that no other writer is running).
    keep = {tensor_name, previous}
    temps = _TMP_PREFIX if exclusive else own_tmp
    for old in directory.iterdir():
        stale_tensors = old.name.startswith("tensors-") and old.name.endswith(".safetensors")
        if (stale_tensors and old.name not in keep) or old.name.startswith(temps):
            _remove(old)
    return directory


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_manifest(directory: Path) -> dict:
    raw = read_file(directory / MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(
            f"load_checkpoint: {directory / MANIFEST} nests too deeply to be a duogard checkpoint "
            f"manifest (it is damaged or was edited)"
        ) from None
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(
            f"load_checkpoint: {directory / MANIFEST} is not JSON; not a duogard "
            f"checkpoint manifest (nothing else is ever parsed)"
        ) from None
    return check_manifest(manifest, directory / MANIFEST)


def read(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """One committed ``(manifest, arrays)`` pair, checked against each other.

    A writer removes a tensor file once two newer saves are committed; a reader that finds
    the file its manifest named gone re-reads the manifest (a bounded number of times).
    """
    seen = None
    for attempt in range(_READ_ATTEMPTS):
        manifest = read_manifest(directory)
        entry = manifest["tensors"]
        name = entry["file"]
        try:
            blob = read_file(directory / name)
        except FileNotFoundError:
            if name == seen:  # the manifest still names it: it is not coming back
                raise CheckpointError(
                    f"load_checkpoint: {directory / MANIFEST} names the tensor file {name}, which "
                    f"does not exist; the checkpoint is incomplete (a file was deleted, or the "
                    f"directory was copied without it)"
                ) from None
            seen = name
            time.sleep(0.001 * attempt)
            continue
        if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CheckpointError(
                f"load_checkpoint: {directory / name} does not match the size/SHA-256 "
                f"recorded in {MANIFEST}; the checkpoint is corrupt"
            )
        tensors = decode_tensors(blob, directory / name)
        check_tensors(manifest, tensors, directory / MANIFEST)
        return manifest, tensors
    raise CheckpointError(
        f"load_checkpoint: {directory} changed under {_READ_ATTEMPTS} reads in a row (a writer "
        f"saves faster than this reader reads); try again"
    )
