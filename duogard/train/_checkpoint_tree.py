"""How a checkpoint names and rebuilds a pytree: dotted leaf names, the structure spec of the
manifest, leaf metadata, and the JSON encoding of the manifest's free-form parts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np
import optree

from duogard.backend import backend_of


def _entry_name(entry) -> str:
    name = getattr(entry, "field", None)  # NamedTuple / dataclass entries: the field name
    return str(entry.entry if name is None else name)


def _flatten(part: str, tree):
    """``(keys, leaves, treespec)`` with dotted keys ``part.a.0.b`` (the part alone for a leaf)."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree)
    keys = [".".join([part, *(_entry_name(e) for e in acc)]) for acc in accessors]
    seen, dupes = set(), set()
    for k in keys:
        (dupes if k in seen else seen).add(k)
    if dupes:
        raise ValueError(
            f"checkpoint: {part} has leaves whose dotted names collide: "
            f"{sorted(dupes)} (rename dict keys that contain '.')"
        )
    return keys, leaves, spec


def _leaf_info(where: str, x) -> tuple[tuple, str, str]:
    """``(shape, dtype name, kind)``; kind is "array", "int", "float" or "bool"."""
    if isinstance(x, bool):
        return (), "bool", "bool"
    if isinstance(x, int):
        return (), "int64", "int"
    if isinstance(x, float):
        return (), "float64", "float"
    if isinstance(x, (np.ndarray, np.generic)):
        return tuple(x.shape), x.dtype.name, "array"
    be = backend_of(x)
    if not be.is_array(x):
        raise TypeError(
            f"checkpoint: {where} must be an array (NumPy, JAX, PyTorch) or a Python "
            f"number, got {type(x).__module__}.{type(x).__name__}"
        )
    return tuple(x.shape), be.dtype_name(x.dtype), "array"


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, (bool, int, float)):
        return np.asarray(x, dtype={bool: np.bool_, int: np.int64, float: np.float64}[type(x)])
    if not isinstance(x, (np.ndarray, np.generic)):
        x = backend_of(x).to_numpy(x)
    return np.asarray(x, order="C")  # keeps 0-d arrays 0-d


def _structure(spec) -> Any:
    """A JSON description of an optree treespec ("*" for a leaf), rebuilt by :func:`_rebuild`."""
    if spec.is_leaf():
        return "*"
    kind, children = spec.kind, [_structure(c) for c in spec.children()]
    if kind == optree.PyTreeKind.NONE:
        return None
    if kind in (optree.PyTreeKind.DICT, optree.PyTreeKind.ORDEREDDICT, optree.PyTreeKind.DEFAULTDICT):
        keys = list(spec.entries())
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
            raise TypeError(f"checkpoint: dict keys must be str or int, got {keys}")
        return {"type": "dict", "keys": keys, "children": children}
    if kind == optree.PyTreeKind.TUPLE:
        return {"type": "tuple", "children": children}
    if kind == optree.PyTreeKind.LIST:
        return {"type": "list", "children": children}
    if kind == optree.PyTreeKind.NAMEDTUPLE:
        return {
            "type": "namedtuple",
            "name": spec.type.__name__,
            "fields": list(spec.type._fields),
            "children": children,
        }
    return {
        "type": "custom",
        "name": f"{spec.type.__module__}.{spec.type.__qualname__}",
        "children": children,
    }


@functools.cache
def _namedtuple_type(name: str, fields: tuple[str, ...]):
    return collections.namedtuple(name, fields)


def _rebuild(part: str, node, leaves) -> Any:
    if node == "*":
        return next(leaves)
    if node is None:
        return None
    children = [_rebuild(part, c, leaves) for c in node["children"]]
    kind = node["type"]
    if kind == "dict":
        return dict(zip(node["keys"], children))
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return list(children)
    if kind == "namedtuple":
        return _namedtuple_type(node["name"], tuple(node["fields"]))(*children)
    raise ValueError(
        f"load_checkpoint: {part} contains a {node['name']} node, which cannot be "
        f"rebuilt from JSON; pass like_{part}= (a template, e.g. optimizer.init(params))"
    )


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # NumPy/JAX/torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__module__}.{type(obj).__name__} is not JSON-serialisable")


def _to_json(arg: str, value) -> Any:
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"save_checkpoint: {arg} must be JSON-serialisable (dicts, lists, str, "
            f"numbers, dataclasses, scalar arrays): {exc}"
        ) from None
