"""duogard: forward gradients against backprop, on JAX and PyTorch at once.

``import duogard`` imports neither JAX nor PyTorch: a framework is imported when a backend
is first asked for (:func:`backend`), or when a framework-specific extra
(``duogard.torch.forward_grad_``, ``duogard.from_torch``) is first used.

Every framework-free package is imported here and re-exported explicitly; the only names
resolved on first use are the framework-specific extras (``from_torch``, ``to_torch``: the
torch backend registers them, see :func:`duogard.backend.load_extra`) and ``cli``, the
``duogard`` command, which the library never imports.
"""

from __future__ import annotations

import importlib

from duogard import (
    backend,  # the package; the name is the function of the same name below
    comparison,
    data,
    grad,
    interop,
    losses,
    methods,
    nn,
    optim,
    parity,
    step,
    testing,
    torch,
    train,
    tree,
)
from duogard._version import __version__
from duogard.backend import available_backends, backend, backend_of, extras_module, use_backend  # noqa: F811
from duogard.comparison import compare_methods
from duogard.grad import estimator, supervised
from duogard.interop import convert
from duogard.nn import lora
from duogard.train import Trainer, fit

__all__ = [
    "__version__",
    # backends
    "available_backends",
    "backend",
    "backend_of",
    "use_backend",
    # the packages
    "nn",
    "losses",
    "optim",
    "grad",
    "data",
    "train",
    "interop",
    "parity",
    "methods",
    "comparison",
    "step",
    "testing",
    "tree",
    "torch",
    "cli",
    # the names of everyday use
    "estimator",
    "supervised",
    "fit",
    "Trainer",
    "convert",
    "compare_methods",
    "lora",
    # registered extras of the torch backend (loaded on first use)
    "from_torch",
    "to_torch",
]

_extra, _dir = extras_module(__name__, globals())


def __getattr__(name: str):
    if name == "cli":  # the command's package: the library never imports it
        value = globals()["cli"] = importlib.import_module("duogard.cli")
        return value
    return _extra(name)


def __dir__():
    return sorted(set(_dir()) | {"cli"})
