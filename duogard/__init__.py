"""duogard: forward gradients against backprop, on JAX and PyTorch at once.

``import duogard`` imports neither JAX nor PyTorch: a framework is imported when a backend
is first asked for (:func:`backend`), or when a framework-specific extra
(``duogard.torch.forward_grad_``, ``duogard.from_torch``) is first used.
"""

from __future__ import annotations

import importlib

from duogard import losses, nn, tree
from duogard.backend import available_backends, backend, backend_of, use_backend

__version__ = "0.1.0"

# Submodules and names loaded on first use (some import a framework; all are heavier than
# the front door needs to be).
_LAZY_MODULES = ("optim", "grad", "data", "train", "interop", "parity", "testing", "torch", "cli")
_LAZY_NAMES = {
    "convert": "duogard.interop",
    "from_torch": "duogard.interop",
    "to_torch": "duogard.interop",
    "estimator": "duogard.grad",
    "supervised": "duogard.grad",
    "fit": "duogard.train",
    "Trainer": "duogard.train",
}

__all__ = [
    "__version__",
    "available_backends",
    "backend",
    "backend_of",
    "use_backend",
    "nn",
    "losses",
    "tree",
    *_LAZY_MODULES,
    *_LAZY_NAMES,
]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        value = importlib.import_module(f"duogard.{name}")
    elif name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'duogard' has no attribute {name!r}")
    globals()[name] = value  # resolved once; later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(__all__)
