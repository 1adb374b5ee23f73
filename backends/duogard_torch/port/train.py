"""Forward gradients in an existing PyTorch training loop: :func:`forward_grad_`.

Port a backprop loop to forward gradients by replacing ``loss.backward()``::

    keys = dg.torch.KeySequence(seed=0)            # once, before the loop
    for x, y in loader:
        loss = dg.torch.forward_grad_(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                      (x, y), method="forward", key=keys)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, unchanged
        optimizer.step(); scheduler.step()                          # torch.optim, unchanged
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from duogard.backend import backend
from duogard.grad import estimator as make_estimator
from duogard.step import build_step

__all__ = ["KeySequence", "forward_grad_"]


class KeySequence:
    """A deterministic stream of random keys, made once and passed to every step.

    The ``i``-th key is ``be.fold_in(be.key(seed), start + i)``: the same seed gives the same
    keys, on every run, with no global random state. ``step`` counts the keys handed out
    (save it with a checkpoint, and resume with ``KeySequence(seed, start=step)``).

    Args:
        seed: an int.
        start: the index of the first key (default 0).
        backend: the backend whose keys to make (default ``"torch"``).
    """

    def __init__(self, seed: int, *, start: int = 0, backend: str = "torch"):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"KeySequence: seed must be an int, got {type(seed).__name__}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"KeySequence: start must be an int >= 0, got {start!r}")
        self.seed = seed
        self.step = start
        self._be = _backend(backend)
        self._base = self._be.key(seed)

    def key(self, step: int):
        """The key of step ``step`` (does not advance the sequence)."""
        return self._be.fold_in(self._base, int(step))

    def __next__(self):
        k = self.key(self.step)
        self.step += 1
        return k

    def __iter__(self):
        return self

    def __repr__(self) -> str:
        return f"KeySequence(seed={self.seed}, step={self.step}, backend={self._be.name!r})"


def _backend(name):
    return backend(name)


def _resolve_key(key, est, be):
    if isinstance(key, KeySequence):
        if key._be is not be:
            raise ValueError(
                f"forward_grad_: key is a KeySequence of the {key._be.name!r} backend; "
                "make it with KeySequence(seed) (torch keys)"
            )
        return next(key)
    if key is None:
        if getattr(est, "stochastic", False):
            raise ValueError(
                f"forward_grad_: method {est.name!r} draws random tangents and needs key=: create "
                "keys = duogard.torch.KeySequence(seed) once and pass key=keys at every step "
                "(or pass one torch backend key per step: be.fold_in(be.key(seed), step))"
            )
        return None
    if isinstance(key, (int, bool)):
        raise TypeError(
            "forward_grad_: key must be a KeySequence or a torch backend key, got an int (a fixed "
            "seed would draw the same tangents at every step); use key=duogard.torch.KeySequence(seed)"
        )
    if not isinstance(key, torch.Tensor):
        raise TypeError(
            f"forward_grad_: key must be a KeySequence or a torch backend key "
            f"(duogard.backend('torch').key(seed)), got {type(key).__name__}"
        )
    return key


def _batchnorms_in_training(module) -> list[str]:
    return [
        name or "<root>"
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


def forward_grad_(module, loss_fn: Callable, batch: Any, *, method="forward", key=None, **estimator_options):
    """Compute a gradient estimate of ``loss_fn(module, batch)`` and store it in every
    parameter's ``.grad``; return the loss.

    A drop-in for ``optimizer.zero_grad(); loss = loss_fn(module, batch); loss.backward()``:
    afterwards ``optimizer.step()``, LR schedulers and ``clip_grad_norm_`` work unchanged.

    Args:
        module: a ``torch.nn.Module``, in the train/eval mode you want (as for backprop).
        loss_fn: ``loss_fn(module, batch) -> tensor of one element`` (any shape, as
            ``loss.backward()`` takes), written exactly as for backprop
            (it calls ``module(x)``). duogard runs it functionally underneath: the module's
            parameters are swapped for ``torch.func`` tensors with
            ``torch.func.functional_call``; its buffers are used as they are.
        batch: anything; passed to ``loss_fn`` unchanged.
        method: a duogard estimator name (``"forward"``, ``"backprop"``, ``"forward-exact"``)
            or an estimator object (``duogard.estimator("forward", num_tangents=4)``).
            ``"forward-activity"`` needs a duogard Sequential model and is not available here.
        key: for stochastic methods (``"forward"``), a :class:`KeySequence` (advanced by one
            per call: the usual choice) or one torch backend key for this call. Required for
            them; there is no hidden global random state.
        **estimator_options: options of the estimator, e.g. ``num_tangents=4``,
            ``distribution="rademacher"``, ``orthogonal=True``, ``projection=True``.

    Returns:
        The loss as a detached 0-d tensor (``loss.item()`` works).

    Only parameters with ``requires_grad=True`` are estimated; their ``.grad`` is SET to the
    estimate (replacing any previous value: no accumulation, like ``zero_grad()`` followed by
    ``backward()``); frozen parameters' ``.grad`` are left alone. The forward estimator draws
    its tangent as one flat vector over the parameters in sorted-name order (see
    ``duogard.grad.Forward``).

    Raises:
        ValueError: BatchNorm layers with running statistics are in training mode (they would
            update their buffers in place inside a functional transform; use ``module.eval()``
            for them, or ``track_running_stats=False``); a stochastic method without ``key``.
        duogard.grad.ForwardModeError: an op of the loss has no forward-mode rule.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"forward_grad_: module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            f"forward_grad_: loss_fn must be callable as loss_fn(module, batch), got {type(loss_fn).__name__}"
        )
    est = make_estimator(method, **estimator_options)
    be = backend("torch")
    bns = _batchnorms_in_training(module)
    if bns:
        raise ValueError(
            f"forward_grad_: BatchNorm layers {bns} are in training mode with running statistics: "
            "they update their buffers in place, which torch.func transforms (jvp, grad) cannot do. "
            "Put them in eval mode (module.eval() or layer.eval()), or build them with "
            "track_running_stats=False"
        )
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"forward_grad_: {type(module).__name__} has no parameter with requires_grad=True")
    params = {name: p.detach() for name, p in named}
    step_key = _resolve_key(key, est, be)
    wrapper = _LossCall(module, loss_fn)

    def functional_loss(p, b):
        out = torch.func.functional_call(wrapper, {"module." + k: v for k, v in p.items()}, (b,))
        # what loss.backward() accepts: a tensor of one element, of any shape ((), (1,), (1, 1))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"forward_grad_: loss_fn must return a tensor of one element, got {got}")
        return out.reshape(())

    # the one step builder, with no update (torch.optim applies it): the user's batch rides as the
    # step's inputs, passed to loss_fn unchanged
    step = build_step(be, lambda p, b: functional_loss(p, b.inputs), est, update="none", grad_norm=False)
    _, _, loss, _, grads = step(params, None, batch, None, step_key)
    with torch.no_grad():
        for name, p in named:
            g = grads[name]
            p.grad = g.detach().to(dtype=p.dtype, device=p.device)
    return loss.detach()


class _LossCall(torch.nn.Module):
    """``forward(batch) = loss_fn(module, batch)``, so functional_call can swap the params."""

    def __init__(self, module, loss_fn):
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.module, batch)
