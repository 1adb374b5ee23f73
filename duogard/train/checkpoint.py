"""Checkpoints: safetensors for the arrays, a JSON manifest for the rest; atomic; never pickled.

A checkpoint is a directory::

    run/ckpt/
      checkpoint.json                          the manifest: step, config, metrics, versions,
                                               pytree structures, leaf names/shapes/dtypes,
                                               and the name + SHA-256 of the tensor file
      tensors-00000100-3fa2c1d0.safetensors    every array, flat: "params.0.weight",
                                               "opt_state.0.mu.0.weight", ..., "key"
      tensors-00000090-9b1e0c77.safetensors    the previous save's, kept for readers
      .duogard-lock                            the writer lock (who holds it: pid, host, time)

Writing is crash-safe: every save writes a new, uniquely named tensor file (to a temporary
file, fsynced, renamed, the directory fsynced); then the manifest naming it is written to a
temporary file, fsynced and renamed over ``checkpoint.json`` (the commit point), and the
directory is fsynced. Only then are older tensor files removed, all but the one the
previous manifest named. A crash at any moment therefore leaves ``checkpoint.json``
pointing at a whole tensor file: the previous checkpoint before the commit, the new one
after.

A directory is safe to share. One writer at a time: a writer holds an advisory lock on
``.duogard-lock`` (``save_checkpoint`` for one save, a ``Checkpointer`` for its whole run),
and a second writer fails at once with :class:`CheckpointLockedError` naming the holder's
pid and host (see ``duogard.train._checkpoint_lock``; without ``fcntl``, as on Windows,
processes are not locked against each other). Readers take no lock: a reader that read the
previous manifest still finds its tensor file, and one that finds the tensor file gone (the
writer saved twice meanwhile) re-reads the manifest, so every load returns one complete,
self-consistent checkpoint.

Loading reads JSON and safetensors only (no pickle, no code), checks the manifest's schema
and the tensor file against the manifest (the SHA-256, and exactly the same leaves, shapes
and dtypes: anything else is a :class:`CheckpointError`), and, given ``like_*`` templates,
fills the template's leaves in order after checking names, shapes and dtypes, listing every
difference at once. Arrays go through NumPy, so a checkpoint written from one backend loads
into any other; bfloat16 is stored as safetensors' BF16 and read back as
``ml_dtypes.bfloat16``, bitwise, like every other dtype except complex128 (refused on save).
"""

from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optree
import safetensors.numpy

from duogard.backend import backend as get_backend
from duogard.backend import backend_of
from duogard.train._checkpoint_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    check_writable,
)
from duogard.train._checkpoint_io import commit, make_dir, read, read_manifest
from duogard.train._checkpoint_lock import LOCK_NAME, CheckpointLockedError, DirectoryLock
from duogard.train._checkpoint_tree import (
    _flatten,
    _leaf_info,
    _rebuild,
    _structure,
    _to_json,
    _to_numpy,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "read_checkpoint_manifest",
    "lock_directory",
    "save_locked",
    "MANIFEST",
    "LOCK_NAME",
]


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the given templates (missing/extra keys, shapes, dtypes)."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    ``params`` and ``opt_state`` are pytrees (of NumPy arrays, or of the requested
    backend's arrays); ``key`` is the RNG key (its raw uint32 data in NumPy, or a key of the
    requested backend) or None; ``info`` holds the manifest's provenance (duogard version,
    the backend that wrote it, creation time, the directory).
    """

    params: Any
    opt_state: Any
    step: int
    key: Any
    config: Any
    metrics: Any
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike, *, params, opt_state=None, step: int, key=None, config=None, metrics=None
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns its path.

    ``params`` and ``opt_state`` are pytrees (dicts, lists, tuples, NamedTuples) of arrays of
    any backend or NumPy, or Python numbers; ``key`` a backend RNG key (stored as its raw
    uint32 data) or None; ``config`` and ``metrics`` anything JSON-serialisable (dataclasses
    and scalar arrays are converted). Overwriting an existing checkpoint is atomic: a crash
    at any point leaves either the old or the new checkpoint, whole. Every dtype is stored
    bitwise (bfloat16 and float16 included); complex128 is refused, naming the leaf.

    The save holds the directory's writer lock: if another writer holds it (another
    process, or a :class:`~duogard.train.Checkpointer` running in this one), it raises
    :class:`CheckpointLockedError` naming the holder, and writes nothing.
    """
    blob, manifest, step = _serialise(params, opt_state, step, key, config, metrics)
    directory = make_dir(Path(path))
    with DirectoryLock(directory) as lock:
        return commit(directory, blob, manifest, step, exclusive=lock.exclusive)


def lock_directory(path: str | os.PathLike) -> DirectoryLock:
    """Take (and return) the writer lock of checkpoint directory ``path``, creating it.

    For a writer that saves many times (the :class:`~duogard.train.Checkpointer`): a second
    writer then fails when it starts, not at one of its saves. Save with
    :func:`save_locked`; ``release()`` the lock at the end.
    """
    return DirectoryLock(make_dir(Path(path))).acquire()


def save_locked(
    lock: DirectoryLock, *, params, opt_state=None, step: int, key=None, config=None, metrics=None
) -> Path:
    """:func:`save_checkpoint` into the directory of ``lock``, which the caller holds."""
    if not lock.held:
        raise RuntimeError(f"save_checkpoint: the writer lock of {lock.directory} is not held")
    blob, manifest, step = _serialise(params, opt_state, step, key, config, metrics)
    return commit(lock.directory, blob, manifest, step, exclusive=lock.exclusive)


def _serialise(params, opt_state, step, key, config, metrics) -> tuple[bytes, dict, int]:
    """Check the arguments; ``(tensor file bytes, manifest less its "tensors" entry, step)``."""
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"save_checkpoint: step must be an int, got {type(step).__name__}") from None
    if step < 0 or isinstance(step, bool):
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if params is None:
        raise ValueError("save_checkpoint: params is required, got None")

    tensors: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    writer = None
    parts = {}
    for part, tree in (("params", params), ("opt_state", opt_state)):
        if tree is None:
            parts[part] = None
            continue
        keys, leaves, spec = _flatten(part, tree)
        meta = []
        for k, leaf in zip(keys, leaves):
            shape, dtype, kind = _leaf_info(k, leaf)
            if writer is None and kind == "array" and not isinstance(leaf, (np.ndarray, np.generic)):
                writer = backend_of(leaf)
            try:
                tensors[k] = _to_numpy(leaf)
            except ImportError as exc:  # bfloat16 without ml_dtypes
                raise ImportError(f"save_checkpoint: {k} ({dtype}): {exc}") from exc
            except TypeError as exc:  # a dtype NumPy cannot hold
                raise TypeError(f"save_checkpoint: {k} ({dtype}): {exc}") from exc
            check_writable(k, tensors[k])
            meta.append({"key": k, "shape": list(shape), "dtype": tensors[k].dtype.name, "kind": kind})
        parts[part] = {"structure": _structure(spec), "leaves": meta}

    key_meta = None
    if key is not None:
        if isinstance(key, (np.ndarray, np.generic)):
            data, key_backend = np.asarray(key, order="C"), None
        else:
            key_be = backend_of(key)
            if not key_be.is_array(key):
                raise TypeError(f"save_checkpoint: key must be an RNG key array, got {type(key).__name__}")
            data, key_backend = np.asarray(key_be.key_data(key), order="C"), key_be.name
        if not np.issubdtype(data.dtype, np.integer):
            raise TypeError(f"save_checkpoint: key must hold integers (raw key data), got {data.dtype}")
        tensors["key"] = data
        key_meta = {"shape": list(data.shape), "dtype": data.dtype.name, "backend": key_backend}

    from duogard._version import __version__

    manifest.update(
        duogard_version=__version__,
        backend=writer.name if writer is not None else "numpy",
        framework_version=writer.framework_version() if writer is not None else np.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        step=step,
        config=_to_json("config", config),
        metrics=_to_json("metrics", metrics),
        params=parts["params"],
        opt_state=parts["opt_state"],
        key=key_meta,
    )
    try:
        blob = safetensors.numpy.save(tensors, metadata={"format": FORMAT, "step": str(step)})
    except Exception as exc:  # an older safetensors without some dtype (BF16, C64)
        dtypes = sorted({a.dtype.name for a in tensors.values()})
        raise TypeError(f"save_checkpoint: safetensors cannot write these dtypes {dtypes}: {exc}") from None
    return blob, manifest, step


# ----------------------------------------------------------------------------- load


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        return path.parent
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"load_checkpoint: {path} holds no {MANIFEST}; it is not a "
                f"duogard checkpoint (or its first save never completed)"
            )
        return path
    if path.exists():
        raise ValueError(
            f"load_checkpoint: {path} is a file, not a duogard checkpoint directory "
            f"(a directory holding {MANIFEST} and a .safetensors file). duogard never "
            f"unpickles, so .pt/.pkl/.ckpt pickle files cannot be loaded"
        )
    raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}")


def _restore_leaf(arr: np.ndarray, kind: str, be, device):
    if kind == "int":
        return int(arr)
    if kind == "float":
        return float(arr)
    if kind == "bool":
        return bool(arr)
    if be is None:
        return arr
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.as_tensor does not take
        from duogard.interop import convert

        return be.asarray(convert(arr, to=be), dtype="bfloat16", device=device)
    # dtype passed explicitly: JAX without 64-bit mode then refuses float64 instead of truncating
    return be.asarray(arr, dtype=arr.dtype.name, device=device)


def _restore_key(data: np.ndarray, be, directory: Path):
    """The key of ``be`` from its raw data, which must have the shape and dtype of ``be``'s keys
    (raw data of another shape or dtype would load as a key that is not one).
    """
    like = np.asarray(be.key_data(be.key(0)))
    if data.shape != like.shape or data.dtype != like.dtype:
        raise CheckpointError(
            f"load_checkpoint: {directory}: 'key' holds {data.dtype.name}{list(data.shape)}, but a "
            f"{be.name} key is {like.dtype.name}{list(like.shape)} (the checkpoint is damaged or was edited)"
        )
    return be.key_from_data(data)


_SCALAR_KINDS = {"int": "iu", "float": "f", "bool": "b"}


def _compatible(saved: np.dtype, like_dtype: str, like_kind: str) -> bool:
    """Same dtype; or integers into integers (cast later, if the values fit); a Python
    number template accepts a 0-d array of its kind.
    """
    if like_kind != "array":
        return saved.kind in _SCALAR_KINDS[like_kind]
    return saved.name == like_dtype or (saved.kind in "iu" and like_dtype.startswith(("int", "uint")))


def _match(part: str, meta: dict | None, tensors: dict, like, problems: list[str]):
    """Template-driven restore: ``(leaves, treespec)``; mismatches are appended to ``problems``."""
    like_keys, like_leaves, spec = _flatten(part, like)
    saved = {m["key"]: m for m in (meta["leaves"] if meta else [])}
    missing = [k for k in like_keys if k not in saved]
    extra = [k for k in saved if k not in set(like_keys)]
    shapes, dtypes, out = [], [], []
    for k, leaf in zip(like_keys, like_leaves):
        if k not in saved:
            continue
        shape, dtype, kind = _leaf_info(k, leaf)
        arr = tensors[k]
        if tuple(arr.shape) != shape:
            shapes.append(f"{k}: checkpoint {tuple(arr.shape)}, expected {shape}")
        elif not _compatible(arr.dtype, dtype, kind):
            dtypes.append(f"{k}: checkpoint {arr.dtype.name}, expected {dtype}")
        elif kind == "array" and arr.dtype.name != dtype:
            cast = arr.astype(dtype)
            if not np.array_equal(cast, arr):
                dtypes.append(f"{k}: checkpoint {arr.dtype.name} values do not fit {dtype}")
            out.append((cast, kind))
        else:
            out.append((arr, kind))
    for label, items in (
        ("missing keys", missing),
        ("extra keys", extra),
        ("wrong shapes", shapes),
        ("wrong dtypes", dtypes),
    ):
        if items:
            problems.append(f"{part}: {label} ({len(items)}):\n    " + "\n    ".join(items))
    return out, spec


def load_checkpoint(
    path: str | os.PathLike, *, like_params=None, like_opt_state=None, backend=None, device=None
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (by any backend).

    Only JSON and safetensors are read; the tensor file must match the SHA-256 recorded in
    the manifest, and the manifest (its schema, and exactly the tensor file's leaves, shapes
    and dtypes) is checked first: a damaged or edited one raises :class:`CheckpointError`
    (a ``ValueError``) naming the file and what is wrong. Loading needs no lock and may run
    while a writer saves: it returns one whole checkpoint, the newest or the one before.
    Without templates, ``params`` and ``opt_state`` are rebuilt from the
    recorded structure (NamedTuples come back as namedtuples of the same name and fields).
    With ``like_params`` / ``like_opt_state`` (e.g. ``model.init(...)`` and
    ``optimizer.init(params)``), the template's leaves are filled in order, after checking
    that names, shapes and dtypes agree; every difference (missing keys, extra keys, wrong
    shapes, wrong dtypes) is listed in one :class:`CheckpointMismatchError`. Integer leaves
    (e.g. step counts) are cast to the template's integer dtype when the values fit.

    ``backend`` (a name or module): convert arrays with ``be.asarray(..., device=device)``
    and the key with ``be.key_from_data``; None returns NumPy arrays (bfloat16 as
    ``ml_dtypes.bfloat16``) and raw key data.
    """
    directory = _checkpoint_dir(path)
    manifest, tensors = read(directory)
    be = None if backend is None else get_backend(backend)

    problems: list[str] = []
    matched = {}
    for part, like in (("params", like_params), ("opt_state", like_opt_state)):
        if like is not None:
            matched[part] = _match(part, manifest.get(part), tensors, like, problems)
    if problems:
        raise CheckpointMismatchError(
            f"load_checkpoint: {directory} does not match the given template(s):\n  " + "\n  ".join(problems)
        )

    trees = {}
    for part in ("params", "opt_state"):
        if part in matched:
            pairs, spec = matched[part]
            trees[part] = optree.tree_unflatten(
                spec, [_restore_leaf(arr, kind, be, device) for arr, kind in pairs]
            )
        elif manifest.get(part) is None:
            trees[part] = None
        else:
            meta = manifest[part]
            leaves = iter([_restore_leaf(tensors[m["key"]], m["kind"], be, device) for m in meta["leaves"]])
            trees[part] = _rebuild(part, meta["structure"], leaves)

    key = None
    if manifest.get("key"):
        key = tensors["key"] if be is None else _restore_key(tensors["key"], be, directory)
    info = {
        k: manifest.get(k)
        for k in ("duogard_version", "backend", "framework_version", "created", "format_version")
    }
    info["path"] = str(directory)
    return Checkpoint(
        params=trees["params"],
        opt_state=trees["opt_state"],
        step=int(manifest["step"]),
        key=key,
        config=manifest.get("config"),
        metrics=manifest.get("metrics"),
        info=info,
    )


def read_checkpoint_manifest(path: str | os.PathLike) -> dict:
    """The checked manifest of the checkpoint at ``path`` (its step, config, metrics, ...), without
    reading its tensors: what a resume compares before it loads anything.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint` for a path that holds no checkpoint.
        CheckpointError: a damaged or edited manifest.
    """
    return read_manifest(_checkpoint_dir(path))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory with a committed manifest (cheap, no hashing)."""
    return (Path(path) / MANIFEST).is_file()
