"""Porting PyTorch code to duogard: a ``torch.nn.Module`` as a duogard model, and
forward gradients in an existing torch training loop.

- :mod:`.module`: :func:`from_torch` / :func:`to_torch`, :class:`TorchModel`;
- :mod:`.export`, :mod:`.aten` (:mod:`.aten_core`, :mod:`.aten_nn`): the ``torch.export``
  lowering that runs such a model on another backend (JAX): the forward decomposed to core
  ATen, one rule per operator (``docs/torch-ops.md`` lists them; :mod:`.optable` writes it);
- :mod:`.lower`, :mod:`.rules`: the ``torch.fx`` lowering, the fallback where export cannot
  capture the forward;
- :mod:`.training`: training mode on torch tensors (portable dropout masks, batch norm without
  in-place updates);
- :mod:`.train`: :func:`forward_grad_` and :class:`KeySequence`.

Users reach these through the front end (``duogard.from_torch``, ``duogard.torch.forward_grad_``),
which loads them with ``duogard.backend.extra("torch", name)`` (see :mod:`duogard_torch.extras`).
"""

from .lower import UnsupportedTorchOpsError
from .module import TorchModel, from_torch, to_torch
from .train import KeySequence, forward_grad_

__all__ = ["KeySequence", "TorchModel", "UnsupportedTorchOpsError", "forward_grad_", "from_torch", "to_torch"]
