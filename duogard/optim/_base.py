"""The optimizer protocol: a pair of pure functions over pytrees (optax's shape).

An optimizer (and every piece of one) is a :class:`GradientTransformation`:

- ``init(params) -> state``: the state is a pytree (NamedTuples, tuples, dicts) of arrays
  of the params' framework, step counts included, so it can be checkpointed leaf by leaf;
- ``update(grads, state, params=None) -> (updates, new_state)``: pure, no Python-side
  mutable state, so a whole training step compiles under ``jax.jit`` and runs unchanged,
  eagerly, on torch.

``apply_updates(params, updates)`` adds the updates (they already carry the minus sign).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optree

from duogard.backend import backend_of
from duogard.tree import tree_leaves, tree_map

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "current_learning_rate",
    "step_count",
]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params=None) -> (updates, state)``."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation (an empty pytree)."""


def identity() -> GradientTransformation:
    """The transformation that returns the gradients unchanged."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states."""
    for i, tx in enumerate(transforms):
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            raise TypeError(
                f"chain: argument {i} must be a GradientTransformation (init/update), got {type(tx).__name__}"
            )

    def init(params):
        return tuple(tx.init(params) for tx in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(
                f"chain: expected a state of {len(transforms)} parts (one per transformation), "
                f"got {len(state)}"
            )
        new_state = []
        for tx, s in zip(transforms, state):
            updates, s = tx.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params, updates):
    """``params + updates`` leafwise, keeping each parameter's dtype."""
    be = array_backend("apply_updates", params)
    xp = be.xp
    return tree_map(lambda p, u: xp.astype(p + u, p.dtype, copy=False), params, updates)


# ----------------------------------------------------------------------------- reading a state


def _is_lr_node(x) -> bool:
    fields = getattr(x, "_fields", ())
    if "count" in fields and "learning_rate" in fields:  # ours and from_torch_optimizer's
        return True
    return isinstance(getattr(x, "hyperparams", None), dict)  # optax.inject_hyperparams


def current_learning_rate(state):
    """The learning rate the next ``update`` will use, as a 0-d array (``float()``-able).

    Found in the state of :func:`scale_by_learning_rate` (every optimizer here has one), of
    :func:`from_torch_optimizer`, or of ``optax.inject_hyperparams`` (the ``learning_rate``
    hyperparameter). With several, the first in leaf order is returned. Raises ValueError when
    the state holds none.
    """
    for node in optree.tree_leaves(state, is_leaf=_is_lr_node):
        if not _is_lr_node(node):
            continue
        if hasattr(node, "hyperparams"):
            if "learning_rate" in node.hyperparams:
                return node.hyperparams["learning_rate"]
            continue
        return node.learning_rate
    raise ValueError(
        "current_learning_rate: the state holds no learning rate (use an optimizer from "
        "duogard.optim, scale_by_learning_rate, from_torch_optimizer, or optax.inject_hyperparams)"
    )


def _has_count(x) -> bool:
    return "count" in getattr(x, "_fields", ())


def step_count(state):
    """The number of updates made so far, as a 0-d integer array (the first ``count`` found)."""
    for node in optree.tree_leaves(state, is_leaf=_has_count):
        if _has_count(node):
            return node.count
    raise ValueError("step_count: the state holds no step count")


# ----------------------------------------------------------------------------- helpers


def array_backend(fn: str, tree):
    """The backend that owns the leaves of ``tree`` (raising clearly if they are not arrays)."""
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{fn}: expected a pytree with at least one array leaf, got {tree!r}")
    be = backend_of(leaves[0])
    if not be.is_array(leaves[0]):
        raise TypeError(
            f"{fn}: expected jax arrays or torch tensors, got {type(leaves[0]).__name__}; "
            "put the params on a backend first (duogard.backend(name).asarray)"
        )
    return be


def check_adapter_leaves(fn: str, what: str, tree, be, *, kind: str, fix: str) -> None:
    """An optimizer adapter's check that every leaf of ``tree`` is an array of backend ``be``.

    Args:
        fn: the adapter's name, for the message (``"from_optax"``).
        what: which tree (``"params"``, ``"grads"``).
        tree: the pytree to check.
        be: the backend whose arrays the adapter needs.
        kind: the array type's name, for the message (``"jax.Array"``).
        fix: what to do instead, appended to the message.

    Raises:
        TypeError: naming the first other leaf, what it is and its path.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    for path, leaf in zip(paths, leaves):
        if not be.is_array(leaf):
            owner = backend_of(leaf)
            got = (
                f"a {owner.name} array"
                if owner.is_array(leaf)
                else f"a {type(leaf).__module__}.{type(leaf).__name__}"
            )
            name = ".".join(str(p) for p in path) or "<root>"
            raise TypeError(f"{fn}: expected {kind} leaves in {what}, got {got} at {name!r}; {fix}")


def float_dtype(be, leaves):
    """The widest floating dtype among ``leaves`` (float32 if none is floating)."""
    best = None
    for x in leaves:
        if be.xp.isdtype(x.dtype, "real floating") and (best is None or x.dtype.itemsize > best.itemsize):
            best = x.dtype
    return best if best is not None else be.float32


def as_number(fn: str, arg: str, value) -> float:
    """A real Python float from ``value`` (int, float, NumPy scalar, 0-d array)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{fn}: {arg} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {arg} must be a real number, got {value!r}") from None
    if math.isnan(out):
        raise ValueError(f"{fn}: {arg} must be a real number, got {value!r}")
    return out


def check(fn: str, arg: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{fn}: {arg} must be {expected}, got {value!r}")


def nonneg(fn: str, arg: str, value) -> float:
    v = as_number(fn, arg, value)
    check(fn, arg, value, math.isfinite(v) and v >= 0, ">= 0")
    return v


def positive(fn: str, arg: str, value) -> float:
    v = as_number(fn, arg, value)
    check(fn, arg, value, math.isfinite(v) and v > 0, "> 0")
    return v


def unit_interval(fn: str, arg: str, value) -> float:
    """A decay rate in [0, 1)."""
    v = as_number(fn, arg, value)
    check(fn, arg, value, 0 <= v < 1, "in [0, 1)")
    return v


def positive_int(fn: str, arg: str, value, *, allow_zero: bool = False) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < (0 if allow_zero else 1)
    ):
        raise ValueError(
            f"{fn}: {arg} must be a{' non-negative' if allow_zero else ' positive'} int, got {value!r}"
        )
    return int(value)
