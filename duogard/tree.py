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
    "Rank1",
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


class Rank1:
    """K rank-1 arrays held as their factors: entry ``k`` is ``outer(u[k], w[k])``.

    A leaf of a tangent tree (rank-1 forward-gradient tangents, ``u wᵀ`` per weight) or of a
    factored gradient: ``u`` has shape ``(K, m)`` and ``w`` shape ``(K, *rest)``; the array it
    stands for has shape ``(K, m, *rest)`` (a Linear weight ``(out, in)``: ``rest = (in,)``; a
    Conv2d kernel ``(out, in, kh, kw)``: ``rest = (in, kh, kw)``). Not a pytree node: tree maps
    see it as one leaf, and code that takes dense leaves calls :meth:`dense` first.
    """

    __slots__ = ("u", "w")

    def __init__(self, u: Any, w: Any):
        if u.ndim != 2 or w.ndim < 2 or u.shape[0] != w.shape[0]:
            raise ValueError(
                "Rank1: u must be (K, m) and w (K, ...) with the same K, "
                f"got {tuple(u.shape)} and {tuple(w.shape)}"
            )
        self.u, self.w = u, w

    @property
    def shape(self) -> tuple[int, ...]:
        """``(K, m, *rest)``: the shape of the array it stands for."""
        return (int(self.u.shape[0]), int(self.u.shape[1]), *(int(d) for d in self.w.shape[1:]))

    @property
    def dtype(self):
        return self.u.dtype

    def dense(self, xp) -> Any:
        """The ``(K, m, *rest)`` array (``xp``: the array namespace of the factors)."""
        k, m = self.shape[:2]
        flat = self.u[:, :, None] * xp.reshape(self.w, (k, 1, -1))
        return xp.reshape(flat, self.shape)

    def combine(self, xp, weights) -> Any:
        """``sum_k weights[k] outer(u[k], w[k])`` as one ``(m, *rest)`` array: one product."""
        k = self.shape[0]
        g = xp.matmul(xp.matrix_transpose(self.u * weights[:, None]), xp.reshape(self.w, (k, -1)))
        return xp.reshape(g, self.shape[1:])

    def gram(self, xp) -> Any:
        """The ``(K, K)`` inner products of the K arrays: ``(u uᵀ) * (w wᵀ)`` elementwise."""
        k = self.shape[0]
        w = xp.reshape(self.w, (k, -1))
        return xp.matmul(self.u, xp.matrix_transpose(self.u)) * xp.matmul(w, xp.matrix_transpose(w))

    def __repr__(self) -> str:
        return f"Rank1(shape={self.shape})"
