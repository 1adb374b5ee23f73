"""What only the torch backend offers: its extras.

``pyproject.toml`` registers each under its front-end name (entry points ``duogard.extras``:
``duogard.torch.forward_grad_`` -> ``duogard_torch.extras:forward_grad_``); the front end loads
them by that name on first use (``duogard.backend.load_extra``), so it never imports torch
itself nor names this backend. ``duogard.backend.extra("torch", name)`` reads this module too.

- the ``torch.nn.Module`` port: :func:`from_torch`, :func:`to_torch`, :class:`TorchModel`,
  :class:`UnsupportedTorchOpsError` (:mod:`duogard_torch.port`);
- forward gradients in a torch training loop: :func:`forward_grad_`, :class:`KeySequence`;
- the ``torch.optim`` adapter: :func:`optimizer_from_torch` (``duogard.optim.from_torch_optimizer``),
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
