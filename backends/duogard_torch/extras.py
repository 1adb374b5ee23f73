"""What only the torch backend offers, for ``duogard.backend.extra("torch", name)``.

The front end reaches these through that function only (``duogard.torch``, ``duogard.interop``
and ``duogard.optim`` resolve their torch names here), so it never imports torch itself.

- the ``torch.nn.Module`` port: :func:`from_torch`, :func:`to_torch`, :class:`TorchModel`,
  :class:`UnsupportedTorchOpsError` (:mod:`duogard_torch.port`);
- forward gradients in a torch training loop: :func:`forward_grad_`, :class:`KeySequence`;
- the ``torch.optim`` adapter: :func:`optimizer_from_torch` (``duogard.optim.from_torch``),
  :class:`TorchOptimizerState` (:mod:`duogard_torch.optim`).
"""

from .optim import TorchOptimizerState, optimizer_from_torch
from .port import KeySequence, TorchModel, UnsupportedTorchOpsError, forward_grad_, from_torch, to_torch

__all__ = [
    "from_torch",
    "to_torch",
    "TorchModel",
    "UnsupportedTorchOpsError",
    "forward_grad_",
    "KeySequence",
    "optimizer_from_torch",
    "TorchOptimizerState",
]
