"""Pytree helpers (thin wrappers over optree) shared by the front end and the backends.

Parameters, gradients and optimizer states are nested dicts/lists/tuples whose leaves are
arrays of one framework. optree sorts dict keys, as ``jax.tree_util`` does, so the leaf
order is the same on every backend. ``None`` is an empty subtree, as in JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import optree

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_structure",
    "flatten_dict",
    "unflatten_dict",
    "tree_size",
    "tree_shapes",
]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leafwise over one or more trees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def tree_leaves(tree: Any) -> list:
    return optree.tree_leaves(tree)


def tree_flatten(tree: Any):
    """``(leaves, treedef)``; :func:`tree_unflatten` inverts it."""
    return optree.tree_flatten(tree)


def tree_unflatten(treedef, leaves) -> Any:
    return optree.tree_unflatten(treedef, leaves)


def tree_structure(tree: Any):
    return optree.tree_structure(tree)


def flatten_dict(tree: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> flat ``{"0.weight": leaf}`` (torch ``state_dict`` style keys)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_dict(v, name, sep))
        else:
            out[name] = v
    return out


def unflatten_dict(flat: dict[str, Any], sep: str = ".") -> dict:
    """Inverse of :func:`flatten_dict`."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, last = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def tree_size(tree: Any) -> int:
    """Total number of scalars in the tree."""
    return int(sum(int(np.prod(getattr(x, "shape", ()))) for x in tree_leaves(tree)))


def tree_shapes(tree: Any) -> Any:
    """The same tree with each leaf replaced by its shape tuple."""
    return tree_map(lambda x: tuple(x.shape), tree)
