"""Porting PyTorch code to duogard: a ``torch.nn.Module`` as a duogard model, and
forward gradients in an existing torch training loop.

- :mod:`.module`: :func:`from_torch` / :func:`to_torch`, :class:`TorchModel`;
- :mod:`.lower`, :mod:`.rules`: the ``torch.fx`` lowering that runs such a model on another
  backend (JAX);
- :mod:`.train`: :func:`forward_grad_` and :class:`KeySequence`.

Users reach these through the front end (``duogard.from_torch``, ``duogard.torch.forward_grad_``),
which loads them with ``duogard.backend.extra("torch", name)`` (see :mod:`duogard_torch.extras`).
"""

from .lower import UnsupportedTorchOpsError
from .module import TorchModel, from_torch, to_torch
from .train import KeySequence, forward_grad_

__all__ = ["KeySequence", "TorchModel", "UnsupportedTorchOpsError", "forward_grad_", "from_torch", "to_torch"]
