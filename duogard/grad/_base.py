"""Estimator protocol, registry and the flat view of a parameter pytree."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from duogard.backend import backend_of
from duogard.tree import tree_flatten, tree_leaves, tree_unflatten

__all__ = [
    "Estimator",
    "ForwardModeError",
    "FlatView",
    "register",
    "estimator",
    "ESTIMATORS",
    "params_backend",
    "check_bool",
]


class ForwardModeError(NotImplementedError):
    """A forward gradient cannot be computed for this loss (raised instead of a wrong number)."""


def check_bool(method: str, name: str, value) -> bool:
    """Option ``name`` of estimator ``method`` as a bool: True or False (NumPy's too), nothing else.

    Raises:
        TypeError: any other value (``"false"`` is a non-empty string, so truthy: refused rather
            than read as True).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{method}: {name} must be True or False, got {type(value).__name__} {value!r}")


def params_backend(params):
    leaves = tree_leaves(params)
    if not leaves:
        raise ValueError("estimator: params has no array leaves")
    return backend_of(leaves[0])


@dataclass(frozen=True)
class FlatView:
    """Where each leaf of a params pytree lives in one flat vector of length ``size``."""

    treedef: Any
    shapes: tuple
    offsets: tuple  # start of each leaf; offsets[-1] == size

    @classmethod
    def of(cls, params) -> FlatView:
        leaves, treedef = tree_flatten(params)
        shapes = tuple(tuple(x.shape) for x in leaves)
        offsets = tuple(int(v) for v in np.cumsum([0] + [int(np.prod(s)) for s in shapes]))
        return cls(treedef, shapes, offsets)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def unflatten(self, be, flat, *, leading: tuple = ()):
        """Split ``flat`` (shape ``leading + (size,)``) into a params-shaped pytree (views where possible)."""
        xp = be.xp
        lead = len(leading)
        leaves = []
        for shape, a, b in zip(self.shapes, self.offsets[:-1], self.offsets[1:]):
            piece = flat[(slice(None),) * lead + (slice(a, b),)]
            leaves.append(xp.reshape(piece, (*leading, *shape)))
        return tree_unflatten(self.treedef, leaves)

    def flatten(self, be, tree, *, leading: tuple = ()):
        """The inverse of :meth:`unflatten`: one array of shape ``leading + (size,)``."""
        xp = be.xp
        return xp.concat([xp.reshape(x, (*leading, -1)) for x in tree_leaves(tree)], axis=len(leading))


class Estimator:
    """A gradient estimator: ``est(loss_fn, params, batch, key) -> (loss, grads)``.

    ``loss_fn(params, batch)`` returns a scalar; ``grads`` has the structure of ``params``.
    Stochastic estimators split the work in two so that tangents can be shared between
    backends (parity runs): :meth:`sample` draws them from ``key``; :meth:`estimate` uses
    given tangents. ``__call__`` is ``estimate(..., sample(...))``.
    """

    name: str = "?"
    stochastic: bool = False

    def sample(self, loss_fn, params, batch, key):
        return None

    def estimate(self, loss_fn, params, batch, tangents):
        raise NotImplementedError

    def __call__(self, loss_fn: Callable, params, batch, key=None):
        self._check_key(key)
        return self.estimate(loss_fn, params, batch, self.sample(loss_fn, params, batch, key))

    def factored(self, loss_fn: Callable, params, batch, key=None):
        """``(loss, d, v)`` when the estimate is one params-shaped array ``v`` times a 0-d ``d``
        (the forward gradient with one tangent), else None (the default).

        Lets a training step apply ``p -= lr d v`` without first writing the gradient ``d v``;
        when it is not None, ``d * v`` is exactly what ``__call__`` returns for the same key.
        """
        return None

    def _check_key(self, key) -> None:
        if self.stochastic and key is None:
            raise ValueError(
                f"estimator {self.name!r}: needs an explicit random key (be.key(seed), then "
                "be.fold_in(key, step)); got key=None"
            )

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"estimator({self.name!r}{', ' if opts else ''}{opts})"


ESTIMATORS: dict[str, Callable[..., Estimator]] = {}


def register(name: str):
    """Class decorator: make an estimator available as ``duogard.estimator(name, ...)``."""

    def deco(cls):
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return deco


def estimator(name: str | Estimator, **options) -> Estimator:
    """An estimator by name: ``"backprop"``, ``"forward"``, ``"forward-exact"``, ``"forward-activity"``,
    ``"spsa"``; for models of :class:`duogard.nn.Local` blocks (local losses) also ``"local-backprop"``,
    ``"local-forward-activity"``, ``"local-forward"`` and ``"forward-guess"``.

    The same names are the ``--grad`` flag of the scripts and the CLI. Options are passed to
    the estimator (e.g. ``estimator("forward", num_tangents=4, distribution="rademacher")``);
    an unknown name or option raises an error listing the valid ones.
    """
    if isinstance(name, Estimator):
        if options:
            raise TypeError("estimator: options given with an estimator object; pass a name instead")
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in ESTIMATORS:
        raise ValueError(f"estimator: unknown gradient method {name!r}; expected one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[key]
    signature = inspect.signature(cls).parameters.values()
    valid = sorted(p.name for p in signature if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature)
    unknown = [] if takes_any else sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"estimator {key!r}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) if valid else '(none)'}"
        )
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"estimator {key!r}: {exc}") from None
