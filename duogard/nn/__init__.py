"""Layers written once against the backend contract.

Layers take their output size first and infer input sizes from an example input; params are
plain nested dicts named like torch's ``state_dict``; images are NCHW.
"""

from duogard.nn._activations import (
    ACTIVATIONS,
    Activation,
    activation,
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    tanh,
)
from duogard.nn._conv import Conv2d
from duogard.nn._linear import Linear
from duogard.nn._local import Local
from duogard.nn._lora import Frozen, LoRALinear, LoRASequential, lora
from duogard.nn._mixer import GroupedLinear, Patches, TokenLinear, TokenMean
from duogard.nn._module import Lambda, Module, Sequential
from duogard.nn._norm import Dropout, LayerNorm
from duogard.nn._pool import AvgPool2d, Flatten, MaxPool2d

__all__ = [
    "Module",
    "Sequential",
    "Lambda",
    "Local",
    "Linear",
    "GroupedLinear",
    "TokenLinear",
    "Patches",
    "TokenMean",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "Flatten",
    "Dropout",
    "LayerNorm",
    "lora",
    "LoRALinear",
    "LoRASequential",
    "Frozen",
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
