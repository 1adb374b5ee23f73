"""What a checkpoint's files may hold: the manifest's schema and the tensor file's dtypes.

Every check here runs before a value is used, so a damaged or hand-edited manifest fails
with a :class:`CheckpointError` naming the file and what is wrong (never a KeyError,
TypeError or StopIteration from deep inside the loader), and a manifest that disagrees
with its tensor file (a leaf missing or extra, a shape or dtype that differs) is refused
instead of loading part of the checkpoint.

Tensor files are plain safetensors. bfloat16 is stored with safetensors' own ``BF16`` tag
and comes back as an ``ml_dtypes.bfloat16`` array (NumPy has none of its own; ml_dtypes
comes with JAX). complex128 has no safetensors dtype: saving it is refused.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "check_manifest",
    "check_tensors",
    "check_writable",
    "decode_tensors",
]

FORMAT = "duogard-checkpoint"
FORMAT_VERSION = 1
#: The manifest's file name inside a checkpoint directory.
MANIFEST = "checkpoint.json"

_KINDS = ("array", "int", "float", "bool")
# the dtypes a Python-number leaf is stored as (save_checkpoint writes int64, float64, bool)
_KIND_DTYPES = {"int": ("int", "uint"), "float": ("float",), "bool": ("bool",)}
#: How deep a manifest's tree structure may nest (deeper: a damaged or hostile manifest, refused
#: before Python's recursion limit turns it into a bare RecursionError).
MAX_DEPTH = 200
#: The largest step a manifest may hold (an int64, what every step counter is).
MAX_STEP = 2**63 - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# safetensors' dtype tags, as NumPy dtype names (BF16: ml_dtypes.bfloat16)
_TAGS = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
}
#: The dtypes a checkpoint stores (bitwise).
WRITABLE = frozenset(_TAGS.values())


class CheckpointError(ValueError):
    """A checkpoint's files are damaged, edited or inconsistent (a ``ValueError``)."""


class CheckpointWriteError(OSError):
    """A save that the file system refused (no space left, a quota, an I/O error): an ``OSError``.

    Nothing of the failed save is left in the directory (its temporary and uncommitted files
    are removed, freeing their space), and the checkpoint committed before it, if any, is
    intact; the message names the directory and says which step that is.

    Attributes:
        errno: the operating system's error number (``errno.ENOSPC`` for a full disk).
        step: the step the failed save was writing.
        previous_step: the step of the intact checkpoint in the directory (None: none).
        directory: the checkpoint directory.
    """

    def __init__(self, message: str, *, errno: int | None, step: int, previous_step: int | None, directory):
        super().__init__(message)
        self.errno, self.step, self.previous_step, self.directory = errno, step, previous_step, directory

    def __str__(self) -> str:
        return self.args[0]


# ----------------------------------------------------------------------------- dtypes


def check_writable(key: str, arr: np.ndarray) -> None:
    """Refuse, naming the leaf, a dtype the tensor file cannot hold bitwise."""
    if arr.dtype.name not in WRITABLE:
        raise TypeError(
            f"save_checkpoint: {key} has dtype {arr.dtype.name}, which a checkpoint cannot store "
            f"(safetensors holds {', '.join(sorted(WRITABLE))}); cast it first"
        )


def _numpy_dtype(name: str) -> np.dtype:
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - JAX brings ml_dtypes
        raise ImportError(
            "load_checkpoint: the checkpoint holds bfloat16 arrays, which need ml_dtypes "
            "(NumPy has no bfloat16): pip install ml_dtypes"
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def decode_tensors(blob: bytes, where: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file (read-only views of ``blob``), every dtype of :data:`WRITABLE`."""
    import safetensors

    try:
        flat = safetensors.deserialize(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"load_checkpoint: {where} is not a valid safetensors file: {exc}") from None
    out = {}
    for name, view in flat:
        tag = view["dtype"]
        if tag not in _TAGS:
            raise CheckpointError(
                f"load_checkpoint: {where}: tensor {name!r} has dtype {tag}, which duogard "
                f"checkpoints never hold (expected one of {', '.join(_TAGS)})"
            )
        arr = np.frombuffer(view["data"], dtype=_numpy_dtype(_TAGS[tag])).reshape(view["shape"])
        out[name] = arr.byteswap() if sys.byteorder == "big" else arr  # safetensors is little-endian
    return out


# ----------------------------------------------------------------------------- manifest


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, where: Path):
        self.where = where

    def fail(self, what: str):
        raise CheckpointError(
            f"load_checkpoint: {self.where}: {what} (the manifest is damaged or was edited; "
            f"it is written by save_checkpoint only)"
        )

    def field(self, obj: dict, name: str, where: str, types: tuple, allow_none=False):
        if name not in obj:
            self.fail(f"{where} has no {name!r}")
        value = obj[name]
        if value is None and allow_none:
            return value
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            self.fail(f"{where}[{name!r}] must be {want}, got {_type(value)} {value!r:.60}")
        return value

    def shape(self, value, where: str) -> None:
        if not isinstance(value, list) or not all(_is_int(d) and d >= 0 for d in value):
            self.fail(f"{where} must be a list of non-negative ints, got {value!r:.60}")

    def structure(self, part: str, node, prefix: str | None, names: list, depth: int = 0) -> None:
        """Append the dotted leaf names ``node`` implies (None where a custom node hides them)."""
        if depth > MAX_DEPTH:
            self.fail(f"{part} structure nests deeper than {MAX_DEPTH} levels")
        if node == "*":
            names.append(prefix)
            return
        if node is None:
            return
        at = f"{part} structure at {prefix or part!r}"
        if not isinstance(node, dict):
            self.fail(f"{at} is {_type(node)} {node!r:.60}, not a tree node")
        kind = self.field(node, "type", at, (str,))
        children = self.field(node, "children", at, (list,))
        if kind in ("tuple", "list"):
            entries = list(range(len(children)))
        elif kind == "dict":
            entries = self.field(node, "keys", at, (list,))
            if not all(isinstance(k, str) or _is_int(k) for k in entries):
                self.fail(f"{at}: dict keys must be str or int, got {entries!r:.60}")
        elif kind == "namedtuple":
            self.field(node, "name", at, (str,))
            entries = self.field(node, "fields", at, (list,))
            if not all(isinstance(f, str) and f.isidentifier() for f in entries) or len(set(entries)) < len(
                entries
            ):
                self.fail(f"{at}: namedtuple fields must be distinct identifiers, got {entries!r:.60}")
        elif kind == "custom":
            self.field(node, "name", at, (str,))
            entries = [None] * len(children)
        else:
            self.fail(f"{at} has unknown node type {kind!r:.40}")
        if len(entries) != len(children):
            self.fail(f"{at}: {len(entries)} keys/fields for {len(children)} children")
        for entry, child in zip(entries, children):
            child_prefix = None if entry is None or prefix is None else f"{prefix}.{entry}"
            self.structure(part, child, child_prefix, names, depth + 1)

    def part(self, manifest: dict, part: str, required: bool) -> None:
        meta = manifest.get(part)
        if meta is None:
            if required:
                self.fail(f"{part!r} is missing or null")
            return
        if not isinstance(meta, dict):
            self.fail(f"{part!r} must be an object, got {_type(meta)}")
        self.field(meta, "structure", part, (str, dict), allow_none=True)
        leaves = self.field(meta, "leaves", part, (list,))
        keys = []
        for i, leaf in enumerate(leaves):
            at = f"{part} leaf {i}"
            if not isinstance(leaf, dict):
                self.fail(f"{at} must be an object, got {_type(leaf)}")
            key = self.field(leaf, "key", at, (str,))
            at = f"{part} leaf {key!r}"
            self.shape(self.field(leaf, "shape", at, (list,)), f"{at} shape")
            self.field(leaf, "dtype", at, (str,))
            kind = self.field(leaf, "kind", at, (str,))
            if kind not in _KINDS:
                self.fail(f"{at} has kind {kind!r:.40}, expected one of {_KINDS}")
            if kind != "array" and leaf["shape"]:
                self.fail(f"{at} is a Python {kind} but has shape {leaf['shape']}")
            if kind != "array" and not leaf["dtype"].startswith(_KIND_DTYPES[kind]):
                # a float leaf marked "int" would load truncated (2.7 as 2)
                self.fail(f"{at} is a Python {kind} but has dtype {leaf['dtype']!r:.40}")
            keys.append(key)
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            self.fail(f"{part} lists leaves more than once: {dupes}")
        implied: list = []
        self.structure(part, meta["structure"], part, implied)
        if len(implied) != len(keys):
            self.fail(f"{part} structure holds {len(implied)} leaves but {len(keys)} are listed")
        wrong = [f"{k} (structure: {n})" for k, n in zip(keys, implied) if n is not None and n != k]
        if wrong:
            self.fail(f"{part} leaves disagree with its structure: {', '.join(wrong[:5])}")


def check_manifest(manifest: Any, where: Path) -> dict:
    """Validate a parsed manifest's schema; returns it. Raises :class:`CheckpointError`."""
    check = _Checker(where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"load_checkpoint: {where} is not a duogard checkpoint manifest (expected format {FORMAT!r})"
        )
    version = manifest.get("format_version", 0)
    if not _is_int(version):
        check.fail(f"'format_version' must be an int, got {_type(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"load_checkpoint: {where.parent} uses checkpoint format {version}; "
            f"this duogard reads up to {FORMAT_VERSION}"
        )
    step = check.field(manifest, "step", "the manifest", (int,))
    if not 0 <= step <= MAX_STEP:
        check.fail(f"'step' must be a non-negative int64, got {step:.3g}")
    tensors = check.field(manifest, "tensors", "the manifest", (dict,))
    name = check.field(tensors, "file", "'tensors'", (str,))
    if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
        check.fail(f"bad tensor file name {name!r} (a .safetensors file beside the manifest)")
    if check.field(tensors, "bytes", "'tensors'", (int,)) < 0:
        check.fail("'tensors'['bytes'] is negative")
    if not _SHA256.fullmatch(check.field(tensors, "sha256", "'tensors'", (str,))):
        check.fail(f"'tensors'['sha256'] is not a SHA-256 hex digest: {tensors['sha256']!r:.70}")
    check.part(manifest, "params", required=True)
    check.part(manifest, "opt_state", required=False)
    key = manifest.get("key")
    if key is not None:
        if not isinstance(key, dict):
            check.fail(f"'key' must be an object or null, got {_type(key)}")
        check.shape(check.field(key, "shape", "'key'", (list,)), "'key' shape")
        dtype = check.field(key, "dtype", "'key'", (str,))
        if not dtype.startswith(("int", "uint")):
            check.fail(f"'key' must hold integers (raw key data), got dtype {dtype!r:.40}")
        check.field(key, "backend", "'key'", (str,), allow_none=True)
    return manifest


def check_tensors(manifest: dict, tensors: dict[str, np.ndarray], where: Path) -> None:
    """The manifest's leaves and the tensor file's arrays must be the same names, shapes, dtypes."""
    recorded = {}
    for part in ("params", "opt_state"):
        for m in (manifest.get(part) or {"leaves": []})["leaves"]:
            recorded[m["key"]] = (tuple(m["shape"]), m["dtype"])
    if manifest.get("key") is not None:
        recorded["key"] = (tuple(manifest["key"]["shape"]), manifest["key"]["dtype"])
    missing = [k for k in recorded if k not in tensors]
    extra = sorted(k for k in tensors if k not in recorded)
    problems = []
    if missing:
        problems.append(f"listed in {MANIFEST} but not in the tensor file: {missing}")
    if extra:
        problems.append(f"in the tensor file but not listed in {MANIFEST}: {extra}")
    for k, (shape, dtype) in recorded.items():
        arr = tensors.get(k)
        if arr is not None and (arr.shape != shape or arr.dtype.name != dtype):
            held = f"{arr.dtype.name}{list(arr.shape)}"
            problems.append(f"{k}: {MANIFEST} says {dtype}{list(shape)}, the tensor file holds {held}")
    if problems:
        raise CheckpointError(
            f"load_checkpoint: {where} disagrees with its tensor file; the checkpoint is corrupt:\n  "
            + "\n  ".join(problems)
        )
