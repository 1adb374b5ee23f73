"""duogard for existing PyTorch training loops (``duogard.torch``).

Port a backprop loop to forward gradients by replacing ``loss.backward()``::

    keys = dg.torch.KeySequence(seed=0)            # once, before the loop
    for x, y in loader:
        loss = dg.torch.forward_grad_(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                      (x, y), method="forward", key=keys)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, unchanged
        optimizer.step(); scheduler.step()                          # torch.optim, unchanged

Also here: :func:`from_torch`, :func:`to_torch`, :class:`TorchModel` (a module as a duogard
model). They live in the torch backend (``duogard_torch.port``), which registers them as
extras (entry points ``duogard.extras``); each is loaded on first use with
:func:`duogard.backend.load_extra`, so importing this module imports no framework. Without
PyTorch, using one raises ImportError with the command that installs it.
"""

from __future__ import annotations

from duogard.backend import extras_module

# Every name here is a registered extra (duogard.backend.registered_extras), loaded on first use.
__all__ = ["forward_grad_", "KeySequence", "from_torch", "to_torch", "TorchModel"]

__getattr__, __dir__ = extras_module(__name__, globals())
