"""Activation functions: plain functions of an array, usable directly and inside Sequential."""

from __future__ import annotations

from duogard.backend import backend_of
from duogard.nn._module import Module

__all__ = [
    "Activation",
    "activation",
    "ACTIVATIONS",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "softplus",
    "elu",
    "silu",
    "softmax",
    "log_softmax",
]

#: names of the built-in activations (each is a backend function of the same name)
ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "softplus",
    "elu",
    "silu",
    "softmax",
    "log_softmax",
)


class Activation(Module):
    """An elementwise (or last-axis, for softmax) function as a parameterless layer.

    ``Activation("leaky_relu", negative_slope=0.2)``; call it on an array (``act(x)``) or put
    it in a Sequential. Options are passed to the backend function.
    """

    has_params = False

    def __init__(self, name: str, **options):
        if name not in ACTIVATIONS:
            raise ValueError(f"Activation: unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
        self.name = name
        self.options = options

    def forward(self, be, params, x, *, key=None, train=False):
        return getattr(be, self.name)(x, **self.options)

    def __call__(self, x, **options):
        # an activation is called on an array: nn.relu(x); as a layer, Sequential calls forward()
        return getattr(backend_of(x), self.name)(x, **{**self.options, **options})

    def apply(self, params, x, *, key=None, train=False):
        return self.forward(backend_of(x), params, x)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Activation({self.name!r}{opts})"


def activation(name: str, **options) -> Activation:
    """Look up an activation by name (a clear error lists the known names)."""
    return Activation(name, **options)


relu = Activation("relu")
leaky_relu = Activation("leaky_relu")
tanh = Activation("tanh")
sigmoid = Activation("sigmoid")
gelu = Activation("gelu")
softplus = Activation("softplus")
elu = Activation("elu")
silu = Activation("silu")
softmax = Activation("softmax")
log_softmax = Activation("log_softmax")
