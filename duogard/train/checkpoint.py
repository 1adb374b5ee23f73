"""Checkpoints: safetensors for the arrays, a JSON manifest for the rest; atomic; never pickled.

A checkpoint is a directory::

    run/ckpt/
      checkpoint.json                          the manifest: step, config, metrics, versions,
                                               pytree structures, leaf names/shapes/dtypes,
                                               and the name + SHA-256 of the tensor file
      tensors-00000100-3fa2c1d0.safetensors    every array, flat: "params.0.weight",
                                               "opt_state.0.mu.0.weight", ..., "key"

Writing is crash-safe: the tensor file gets a fresh name, is written to a temporary file,
fsynced and renamed; then the manifest is written to a temporary file, fsynced and renamed
over ``checkpoint.json`` (the commit point), and the directory is fsynced. Only then are
older tensor files removed. A crash at any moment therefore leaves ``checkpoint.json``
pointing at a whole tensor file: the previous checkpoint before the commit, the new one
after. One writer per checkpoint directory at a time.

Loading reads JSON and safetensors only (no pickle, no code), checks the tensor file
against the hash in the manifest, and, given ``like_*`` templates, fills the template's
leaves in order after checking names, shapes and dtypes, listing every difference at once.
Arrays go through NumPy, so a checkpoint written from one backend loads into any other.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optree
import safetensors.numpy

from duogard.backend import backend as get_backend
from duogard.backend import backend_of
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
    "CheckpointMismatchError",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "MANIFEST",
]

FORMAT = "duogard-checkpoint"
FORMAT_VERSION = 1
#: The manifest's file name inside a checkpoint directory.
MANIFEST = "checkpoint.json"
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22


class CheckpointMismatchError(ValueError):
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


# ----------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike, *, params, opt_state=None, step: int, key=None, config=None, metrics=None
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns its path.

    ``params`` and ``opt_state`` are pytrees (dicts, lists, tuples, NamedTuples) of arrays of
    any backend or NumPy, or Python numbers; ``key`` a backend RNG key (stored as its raw
    uint32 data) or None; ``config`` and ``metrics`` anything JSON-serialisable (dataclasses
    and scalar arrays are converted). Overwriting an existing checkpoint is atomic: a crash
    at any point leaves either the old or the new checkpoint, whole.
    """
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
            tensors[k] = _to_numpy(leaf)
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

    from duogard import __version__

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
    blob = safetensors.numpy.save(tensors, metadata={"format": FORMAT, "step": str(step)})
    return _commit(Path(path), blob, manifest, step)


def _commit(directory: Path, blob: bytes, manifest: dict, step: int) -> Path:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"save_checkpoint: {directory} exists and is not a directory "
            f"(a checkpoint is a directory holding {MANIFEST} and its tensors)"
        )
    if not directory.is_dir():
        directory.mkdir(parents=True)
        _fsync_dir(directory.parent)
    token = secrets.token_hex(4)
    tensor_name = f"tensors-{step:08d}-{token}.safetensors"
    manifest["tensors"] = {
        "file": tensor_name,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }

    tmp = directory / f"{_TMP_PREFIX}{token}-{tensor_name}"
    _write_file(tmp, blob)
    os.replace(tmp, directory / tensor_name)
    _fsync_dir(directory)

    tmp = directory / f"{_TMP_PREFIX}{token}-{MANIFEST}"
    _write_file(tmp, json.dumps(manifest, indent=1).encode("utf-8"))
    os.replace(tmp, directory / MANIFEST)  # the commit point
    _fsync_dir(directory)

    # Garbage: older tensor files and temporaries left by crashed writers.
    for old in directory.iterdir():
        stale_tensors = old.name.startswith("tensors-") and old.name.endswith(".safetensors")
        if (stale_tensors and old.name != tensor_name) or old.name.startswith(_TMP_PREFIX):
            try:
                old.unlink()
            except FileNotFoundError:  # pragma: no cover
                pass
    return directory


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


def _read_manifest(directory: Path) -> dict:
    raw = (directory / MANIFEST).read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(
            f"load_checkpoint: {directory / MANIFEST} is not JSON; not a duogard "
            f"checkpoint manifest (nothing else is ever parsed)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(
            f"load_checkpoint: {directory / MANIFEST} is not a duogard checkpoint "
            f"manifest (expected format {FORMAT!r})"
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"load_checkpoint: {directory} uses checkpoint format "
            f"{manifest['format_version']}; this duogard reads up to {FORMAT_VERSION}"
        )
    return manifest


def _read_tensors(directory: Path, manifest: dict) -> dict[str, np.ndarray]:
    entry = manifest["tensors"]
    name = entry["file"]
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"load_checkpoint: bad tensor file name {name!r} in {directory / MANIFEST}")
    blob = (directory / name).read_bytes()
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ValueError(
            f"load_checkpoint: {directory / name} does not match the size/SHA-256 "
            f"recorded in {MANIFEST}; the checkpoint is corrupt"
        )
    try:
        return safetensors.numpy.load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"load_checkpoint: {directory / name} is not a valid safetensors file: {exc}"
        ) from None


def _restore_leaf(arr: np.ndarray, kind: str, be, device):
    if kind == "int":
        return int(arr)
    if kind == "float":
        return float(arr)
    if kind == "bool":
        return bool(arr)
    # dtype passed explicitly: JAX without 64-bit mode then refuses float64 instead of truncating
    return arr if be is None else be.asarray(arr, dtype=arr.dtype.name, device=device)


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
    the manifest. Without templates, ``params`` and ``opt_state`` are rebuilt from the
    recorded structure (NamedTuples come back as namedtuples of the same name and fields).
    With ``like_params`` / ``like_opt_state`` (e.g. ``model.init(...)`` and
    ``optimizer.init(params)``), the template's leaves are filled in order, after checking
    that names, shapes and dtypes agree; every difference (missing keys, extra keys, wrong
    shapes, wrong dtypes) is listed in one :class:`CheckpointMismatchError`. Integer leaves
    (e.g. step counts) are cast to the template's integer dtype when the values fit.

    ``backend`` (a name or module): convert arrays with ``be.asarray(..., device=device)``
    and the key with ``be.key_from_data``; None returns NumPy arrays and raw key data.
    """
    directory = _checkpoint_dir(path)
    manifest = _read_manifest(directory)
    tensors = _read_tensors(directory, manifest)
    recorded = {
        m["key"] for part in ("params", "opt_state") if manifest.get(part) for m in manifest[part]["leaves"]
    } | ({"key"} if manifest.get("key") else set())
    if recorded != set(tensors):
        raise ValueError(
            f"load_checkpoint: {directory} is corrupt: tensor names "
            f"{sorted(set(tensors) ^ recorded)} disagree with {MANIFEST}"
        )
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
        key = tensors["key"] if be is None else be.key_from_data(tensors["key"])
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


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory with a committed manifest (cheap, no hashing)."""
    return (Path(path) / MANIFEST).is_file()
