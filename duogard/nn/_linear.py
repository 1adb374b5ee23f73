"""Linear layer."""

from __future__ import annotations

import math

import numpy as np

from duogard.nn._module import Module

__all__ = ["Linear"]


def _positive_int(layer: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{layer}: {arg} must be a positive int, got {value!r}")
    return int(value)


def uniform_init(rng: np.random.Generator, shape: tuple, fan_in: int, dtype) -> np.ndarray:
    """torch.nn's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` for the weight reduces to the same bound.)
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Linear(Module):
    """``y = x @ weight.T + bias`` over the last axis; ``weight`` is ``(out, in)`` as in torch.

    The input size is inferred from the example input at :meth:`init`.
    """

    def __init__(self, out_features: int, *, bias: bool = True):
        self.out_features = _positive_int("Linear", "out_features", out_features)
        self.bias = bool(bias)

    def init_params(self, rng, input_shape, dtype):
        if len(input_shape) < 1 or input_shape[-1] <= 0:
            raise ValueError(
                f"Linear({self.out_features}): expected an input of shape (..., in_features) with "
                f"in_features > 0, got shape {tuple(input_shape)}"
            )
        fan_in = int(input_shape[-1])
        params = {"weight": uniform_init(rng, (self.out_features, fan_in), fan_in, dtype)}
        if self.bias:
            params["bias"] = uniform_init(rng, (self.out_features,), fan_in, dtype)
        return params, (*input_shape[:-1], self.out_features)

    def forward(self, be, params, x, *, key=None, train=False):
        w = params["weight"]
        if x.ndim < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"Linear({self.out_features}): expected input shape (..., {w.shape[1]}), got {tuple(x.shape)}"
            )
        return be.linear(x, w, params["bias"] if self.bias else None)
