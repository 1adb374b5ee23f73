"""Porting PyTorch code to duogard: a ``torch.nn.Module`` as a duogard model, and
forward gradients in an existing torch training loop.

- :mod:`.module`: :func:`from_torch` / :func:`to_torch`, :class:`TorchModel`;
- :mod:`.export`, :mod:`.aten`: the ``torch.export`` lowering that runs such a model on
  another backend (JAX): the forward decomposed to core ATen, one rule per operator, registered
  by decorator in one module per operator family (``docs/torch-ops.md`` lists them;
  :mod:`.optable` writes it);
- :mod:`.lower`, :mod:`.rules`: the ``torch.fx`` lowering, the fallback where export cannot
  capture the forward;
- :mod:`.registry` (the rule types and tables) and :mod:`.helpers` (what the lowerings share)
  below them all: the port imports top-down, without cycles (``pyproject.toml`` says so);
- :mod:`.training`: training mode on torch tensors (portable dropout masks, batch norm without
  in-place updates);
- :mod:`.train`: :func:`forward_grad_` and :class:`KeySequence`.

Users reach these through the front end (``duogard.from_torch``, ``duogard.torch.forward_grad_``),
where they are registered extras (entry points ``duogard.extras``, see :mod:`duogard_torch.extras`).
"""

from .helpers import UnsupportedTorchOpsError
from .module import TorchModel, from_torch, to_torch
from .train import KeySequence, forward_grad_

__all__ = ["KeySequence", "TorchModel", "UnsupportedTorchOpsError", "forward_grad_", "from_torch", "to_torch"]
