"""The layer protocol: hyperparameters on the object, parameters in a plain dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from duogard.backend import backend_of

__all__ = ["Module", "Sequential", "Lambda", "as_module", "init_rng"]


def init_rng(seed) -> np.random.Generator:
    """A NumPy generator from an int seed (or a Generator, returned as is)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.Generator(np.random.PCG64(int(seed)))
    raise TypeError(f"init: seed must be an int or numpy.random.Generator, got {type(seed).__name__}")


def _float_dtype(example, dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype if isinstance(dtype, str) else getattr(dtype, "name", dtype))
    be = backend_of(example, fallback=False)  # a framework's array names its dtype through its backend
    name = be.dtype_name(example.dtype) if be is not None else str(getattr(example, "dtype", "float32"))
    return np.dtype(name) if name in ("float32", "float64") else np.dtype("float32")


class Module:
    """Base class of every layer and model.

    A layer holds only hyperparameters. Its parameters are a plain nested dict of arrays,
    made in NumPy by :meth:`init` and passed to :meth:`apply`, so the same numbers start on
    every backend. A user's own layer subclasses this and writes two methods:

    - ``init_params(rng, input_shape, dtype) -> (params, output_shape)``: NumPy arrays,
      ``input_shape`` includes the batch dimension;
    - ``forward(be, params, x, *, key, train)``: the computation, with ``be`` the backend
      module that owns ``x`` (``be.xp`` for array-API math, ``be.conv2d`` and friends).
    """

    #: Does this layer have parameters? (Sequential leaves parameterless layers out of the dict.)
    has_params: bool = True

    #: Does the layer compute differently in training (dropout, batch statistics)? Then
    #: training steps run it with ``train=True`` and a key of their own, and evaluation with
    #: ``train=False``.
    has_train_mode: bool = False

    #: Does the layer keep state that training updates but no gradient touches (batch norm's
    #: running statistics)? Then :meth:`initial_state` and :meth:`update_state` say what it is
    #: and how one training step changes it. The state is never mutated in place.
    has_state: bool = False

    def initial_state(self) -> dict:
        """The state before training, a flat dict of NumPy arrays (empty for a stateless layer)."""
        return {}

    def update_state(self, params, x, *, key=None) -> dict:
        """The new state after one training-mode forward pass over ``x``.

        Args:
            params: the params merged with the current state (``{**params, **state}``).
            x: the batch's inputs.
            key: the step's model key (the one the training step's forward pass used).

        Returns:
            New arrays for every state entry (on ``x``'s backend); nothing is mutated.
        """
        return {}

    # -- to be written by subclasses
    def init_params(self, rng: np.random.Generator, input_shape: tuple, dtype: np.dtype):
        return {}, tuple(input_shape)

    def forward(self, be, params, x, *, key=None, train=False):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    # -- public API
    def init(self, seed, example_input, *, dtype=None) -> dict:
        """Initialise parameters in NumPy from ``seed`` and an example input (array or shape).

        Input sizes are inferred from the example (``Linear(10)`` needs no input size); the
        schemes are torch.nn's defaults. Returns a nested dict of NumPy arrays.
        """
        shape = (
            tuple(example_input)
            if isinstance(example_input, (tuple, list))
            else tuple(getattr(example_input, "shape", ()))
        )
        params, _ = self.init_params(init_rng(seed), shape, _float_dtype(example_input, dtype))
        return params

    def output_shape(self, input_shape: tuple) -> tuple:
        """The output shape for an input shape (runs the NumPy init, discards the params)."""
        return tuple(self.init_params(init_rng(0), tuple(input_shape), np.dtype("float32"))[1])

    def apply(self, params, x, *, key=None, train: bool = False):
        """Run the layer on ``x`` (a jax array or torch tensor) with ``params`` of the same framework."""
        return self.forward(backend_of(x), params, x, key=key, train=train)

    def __call__(self, params, x, *, key=None, train: bool = False):
        return self.apply(params, x, key=key, train=train)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_rank(layer: str, x_shape: tuple, rank: int, what: str) -> None:
    if len(x_shape) != rank:
        raise ValueError(f"{layer}: expected a rank-{rank} input {what}, got shape {tuple(x_shape)}")


class Lambda(Module):
    """A parameterless layer from a function of one array (an activation, a reshape ...)."""

    has_params = False

    def __init__(
        self, fn: Callable, *, output_shape: Callable[[tuple], tuple] | None = None, name: str | None = None
    ):
        if not callable(fn):
            raise TypeError(f"Lambda: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self._shape_fn = output_shape
        self.name = name or getattr(fn, "__name__", "lambda")

    def init_params(self, rng, input_shape, dtype):
        out = self._shape_fn(tuple(input_shape)) if self._shape_fn else tuple(input_shape)
        return {}, tuple(out)

    def forward(self, be, params, x, *, key=None, train=False):
        return self.fn(x)

    def __repr__(self) -> str:
        return f"Lambda({self.name})"


def as_module(layer: Any) -> Module:
    """A Module as is; a plain callable (e.g. ``nn.relu`` or a lambda) wrapped in :class:`Lambda`."""
    if isinstance(layer, Module):
        return layer
    if callable(layer):
        return Lambda(layer)
    raise TypeError(f"Sequential: expected a Module or a callable layer, got {type(layer).__name__}")


class Sequential(Module):
    """Layers applied in order. Parameters are keyed by position, like ``torch.nn.Sequential``:
    ``{"0": {"weight", "bias"}, "2": {...}}`` (parameterless layers have no entry), so the flat
    names (``"0.weight"``) are those of the equivalent torch module's ``state_dict``.
    """

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential: expected at least one layer, got none")
        self.layers = tuple(as_module(layer) for layer in layers)

    @property
    def has_train_mode(self) -> bool:  # type: ignore[override]
        return any(layer.has_train_mode for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def init_params(self, rng, input_shape, dtype):
        params, shape = {}, tuple(input_shape)
        for i, layer in enumerate(self.layers):
            p, shape = layer.init_params(rng, shape, dtype)
            if p:
                params[str(i)] = p
        return params, shape

    def forward(self, be, params, x, *, key=None, train=False):
        """Apply the layers in order; layer ``i`` gets the key :meth:`layer_key` ``(key, i)``."""
        for i, layer in enumerate(self.layers):
            x = layer.forward(be, params.get(str(i), {}), x, key=self.layer_key(be, key, i), train=train)
        return x

    @staticmethod
    def layer_key(be, key, i: int):
        """Layer ``i``'s key (its dropout masks): ``fold_in(key, i)``, or None without a key."""
        return None if key is None else be.fold_in(key, i)

    def layer_shapes(self, input_shape: tuple) -> list[tuple]:
        """Output shape of every layer, for an input shape (with the batch dimension)."""
        rng, shape, out = init_rng(0), tuple(input_shape), []
        for layer in self.layers:
            _, shape = layer.init_params(rng, shape, np.dtype("float32"))
            out.append(tuple(shape))
        return out

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"
