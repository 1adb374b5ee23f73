"""Interop between JAX, PyTorch and NumPy: DLPack tree conversion and one shared GPU.

- :func:`convert` moves a pytree of arrays between frameworks, zero-copy where the layout
  allows. Its rules (autograd, strides, alignment, 64-bit values, dtypes, devices, CUDA
  streams, read-only shared buffers, donation) are listed below.
- :func:`configure_shared_gpu` and :func:`pin_matmul_precision` set up JAX and PyTorch to
  share one GPU and to agree on float32 matmul precision (rules in ``_gpu``).
- ``from_torch`` / ``to_torch`` (torch.nn.Module import/export) live in the torch backend
  (``duogard_torch.port``), registered as extras, and are loaded on first use
  (:func:`duogard.backend.load_extra`).

Importing this package imports neither JAX nor PyTorch.
"""

from __future__ import annotations

from duogard.backend import extras_module
from duogard.interop._convert import __doc__ as _convert_rules
from duogard.interop._convert import convert
from duogard.interop._gpu import configure_shared_gpu, pin_matmul_precision

# torch.nn.Module import/export: registered extras of the torch backend, loaded on first use
_EXTRAS = ("from_torch", "to_torch", "TorchModel", "UnsupportedTorchOpsError")

__all__ = ["convert", "configure_shared_gpu", "pin_matmul_precision", *_EXTRAS]

# help(duogard.interop) shows convert's rules too
__doc__ += "\nRules of convert\n----------------\n" + _convert_rules.split("Rules\n-----\n", 1)[-1]

__getattr__, __dir__ = extras_module(__name__, globals())
