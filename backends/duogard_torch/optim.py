"""``torch.optim`` optimizers as duogard optimizers: :func:`optimizer_from_torch`.

Front-end name: ``duogard.optim.from_torch_optimizer`` (``from_torch`` alone is the module port, so
the extra is called ``optimizer_from_torch`` here). Torch optimizers keep their state inside; the
adapter hides one behind ``init``/``update`` (eager only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from duogard.backend import backend
from duogard.optim import GradientTransformation
from duogard.optim._base import check_adapter_leaves
from duogard.tree import tree_flatten, tree_unflatten

__all__ = ["TorchOptimizerState", "optimizer_from_torch"]

_TORCH_FIX = (
    "torch.optim optimizers run on the torch backend (backend='torch'); on JAX use "
    "duogard.optim's own optimizers or from_optax(...)"
)


def _check_leaves(what: str, tree) -> None:
    check_adapter_leaves(
        "from_torch_optimizer", what, tree, backend("torch"), kind="torch.Tensor", fix=_TORCH_FIX
    )


class TorchOptimizerState(NamedTuple):
    """The state of :func:`optimizer_from_torch`: tensors only, so it checkpoints like any other."""

    count: Any  #: updates made so far (0-d int32 CPU tensor)
    learning_rate: Any  #: the first param group's lr for the next update (0-d float64 CPU tensor)
    buffers: Any  #: per parameter (params' structure), the torch optimizer's tensor state


class _TorchDriver:
    """One live torch optimizer over private copies of the params (made by ``init``)."""

    def __init__(self, cls, hyperparameters: dict, scheduler):
        self.cls, self.hyperparameters, self.make_scheduler = cls, hyperparameters, scheduler
        self.optimizer = self.scheduler = self.weights = self.treedef = self.latest = None

    def _construct(self, weights):
        try:
            optimizer = self.cls(weights, **self.hyperparameters)
        except (TypeError, ValueError) as exc:
            args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
            raise type(exc)(
                f"from_torch_optimizer: {getattr(self.cls, '__name__', self.cls)}({args}) failed: {exc}"
            ) from exc
        scheduler = self.make_scheduler(optimizer) if self.make_scheduler is not None else None
        return optimizer, scheduler

    def _state(self, count):
        group = self.optimizer.param_groups[0]
        lr = torch.as_tensor(float(group["lr"]), dtype=torch.float64)
        buffers = [
            {k: v for k, v in self.optimizer.state[w].items() if isinstance(v, torch.Tensor)}
            for w in self.weights
        ]
        self.latest = TorchOptimizerState(count, lr, tree_unflatten(self.treedef, buffers))
        return self.latest

    def init(self, params):
        _check_leaves("params", params)
        leaves, self.treedef = tree_flatten(params)
        self.weights = [p.detach().clone().requires_grad_(p.is_floating_point()) for p in leaves]
        self.optimizer, self.scheduler = self._construct(self.weights)
        count = torch.zeros((), dtype=torch.int32)  # on the CPU, like torch.optim's step
        return self._state(count)

    def _load(self, state) -> None:
        """Make the live optimizer hold ``state`` (a restored or earlier one)."""
        buffers = self.treedef.flatten_up_to(state.buffers)
        for w, saved in zip(self.weights, buffers):
            live = self.optimizer.state[w]
            if live.keys() == saved.keys() and all(live[k] is v for k, v in saved.items()):
                continue
            for k in [k for k, v in live.items() if isinstance(v, torch.Tensor) and k not in saved]:
                del live[k]
            live.update({k: v.clone() for k, v in saved.items()})
        lr = float(state.learning_rate)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if self.scheduler is not None:
            self.scheduler.last_epoch = int(state.count)

    def update(self, grads, state, params=None):
        if self.optimizer is None:
            raise RuntimeError("from_torch_optimizer: call init(params) before update")
        _check_leaves("grads", grads)
        grad_leaves = self.treedef.flatten_up_to(grads)
        with torch.no_grad():
            if params is not None:
                _check_leaves("params", params)
                old = self.treedef.flatten_up_to(params)
                for w, p in zip(self.weights, old):
                    w.copy_(p)
            else:
                old = [w.detach().clone() for w in self.weights]
        if state is not self.latest:
            self._load(state)
        for w, g in zip(self.weights, grad_leaves):
            w.grad = g.detach() if g is not None else None
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            updates = [w.detach() - p for w, p in zip(self.weights, old)]
        for w in self.weights:
            w.grad = None
        return tree_unflatten(self.treedef, updates), self._state(state.count + 1)


def optimizer_from_torch(
    optimizer_class, /, *, scheduler: Callable | None = None, **hyperparameters
) -> GradientTransformation:
    """Use any ``torch.optim`` optimizer with duogard:
    ``from_torch_optimizer(torch.optim.Adam, lr=1e-3)``.

    ``init(params)`` copies the params into fresh leaf tensors and builds
    ``optimizer_class(those, **hyperparameters)``; ``update(grads, state, params)`` copies
    ``params`` in, sets ``.grad``, calls ``.step()`` (then ``scheduler.step()``) and returns
    ``updates = new - old``, so ``apply_updates`` gives the torch optimizer's result (exactly,
    up to the rounding of that subtraction).

    Torch backend and eager mode only (a jax array raises TypeError saying what to use
    instead). The state (:class:`TorchOptimizerState`) holds the step count, the next learning
    rate and the optimizer's per-parameter tensors: these *are* the live optimizer's tensors,
    updated in place by the next ``update`` (clone them to keep a snapshot). A state that is
    not the latest one (a restored checkpoint, an earlier snapshot) is loaded into the
    optimizer first. One live optimizer per ``from_torch_optimizer(...)`` object: ``init`` again
    restarts it.

    Args:
        optimizer_class: a ``torch.optim`` optimizer class (``torch.optim.AdamW``).
        scheduler: optional, builds a torch lr scheduler from the optimizer
            (``lambda opt: StepLR(opt, step_size=30)``); it steps once per update.
        **hyperparameters: the optimizer's keyword arguments (``lr=1e-3``).

    Returns:
        A :class:`duogard.optim.GradientTransformation`.

    Raises:
        TypeError: ``optimizer_class`` or ``scheduler`` is not callable.
        ValueError: the optimizer rejects the hyperparameters (checked at once, on a dummy
            tensor).
    """
    if not callable(optimizer_class):
        raise TypeError(
            f"from_torch_optimizer: expected a torch.optim optimizer class, got {optimizer_class!r}"
        )
    if scheduler is not None and not callable(scheduler):
        raise TypeError(
            f"from_torch_optimizer: scheduler must be a callable optimizer -> lr scheduler, got {scheduler!r}"
        )
    driver = _TorchDriver(optimizer_class, dict(hyperparameters), scheduler)
    driver._construct([torch.zeros(1, requires_grad=True)])  # fail now on bad hyperparameters
    return GradientTransformation(driver.init, driver.update)
