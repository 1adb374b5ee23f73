"""The Trainer: one compiled training step (and evaluation) per model, loss, optimizer and estimator."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from duogard import grad as _grad
from duogard import losses as _losses
from duogard import optim as _optim
from duogard.backend import backend as _select_backend
from duogard.grad._objective import model_batch
from duogard.step import build_step, choose_update, split_state
from duogard.tree import tree_map

__all__ = ["Trainer"]


class Trainer:
    """Holds one compiled step (and evaluation) for a model, loss, optimizer and estimator.

    :func:`duogard.fit` is the one-call front; use a Trainer to drive steps yourself::

        params, opt_state = trainer.init_state(params0)
        params, opt_state, loss, grad_sq_norm = trainer.step(params, opt_state, x, y, key)

    The Trainer owns the params it steps: :meth:`init_state` copies them once, and each step
    may then reuse their buffers (the SGD update strategies write in place on torch and into
    donated buffers on JAX). Pass each step the params that the previous one returned, never
    older ones. When the loss or the gradient is not finite, the step returns the params and
    optimizer state it was given, unchanged, and a NaN fourth result (with one exception, the
    ``"sgd-in-backward"`` strategy under a gradient that turns non-finite inside the network:
    see :mod:`duogard.step`).

    A model with a training mode (``model.has_train_mode``: dropout, batch norm; duogard's
    ``nn.Dropout`` and ported torch modules alike) runs with ``train=True`` in every training
    step, with a model key of its own (``fold_in(key, MODEL_KEY)``: the same dropout masks on
    both backends), and with ``train=False`` in :meth:`evaluate`. A model with state
    (``model.has_state``: batch norm's running statistics) keeps it in ``params`` under
    :attr:`state_names` (:meth:`init_state` adds the model's initial state where missing): no
    estimator or optimizer sees it, and each step replaces it with ``model.update_state`` over
    the step's batch; evaluation then uses it.

    Args:
        model: a duogard model (``init``/``apply``).
        loss: a loss function or name (default softmax cross-entropy).
        optimizer: a ``duogard.optim`` transformation (default ``sgd(0.05)``).
        estimator: a name (``"backprop"``, ``"forward"``, ...) or ``duogard.estimator(...)``.
        backend: ``"jax"``, ``"torch"``, a backend module, or None (the selected default).
        compile: JAX jits by default; torch runs eagerly unless ``compile=True`` (torch.compile).
        grad_norm: return ``|g|²`` as the fourth result of :meth:`step` (one more pass over the
            gradient). With False that result is 0 for a finite step and NaN for one that
            refused a non-finite loss or gradient (a finiteness check replaces the norm).
        update: the update strategy: ``"auto"`` (default: chosen from the optimizer and the
            estimator and the backend by :func:`duogard.step.choose_update`) or one of
            ``"optimizer"``, ``"sgd-in-place"``, ``"sgd-in-backward"`` (backprop's SGD update
            applied leaf by leaf in the backward pass: on torch the whole gradient never
            exists), ``"sgd-factored"``, ``"sgd-lean"`` (``"lean"``: the layer-by-layer
            forward-gradient step whose memory stays flat in depth), ``"zo-lean"`` (SPSA's
            in-place MeZO step; ``"lean"`` with an SPSA estimator).

    Attributes:
        update_strategy: how the step applies the estimate: ``"optimizer"``, ``"sgd-in-place"``,
            ``"sgd-in-backward"``, ``"sgd-factored"``, ``"sgd-lean"`` or ``"zo-lean"`` (see
            :mod:`duogard.step`).
        step: the :class:`duogard.step.Step` that :func:`duogard.step.build_step` built.
        train_mode: the training steps run the model with ``train=True`` (``model.has_train_mode``).
        state_names: the model's state entries in ``params`` (empty for a stateless model).
    """

    def __init__(
        self,
        model,
        *,
        loss: Callable | str | None = None,
        optimizer=None,
        estimator="backprop",
        backend=None,
        compile=None,
        grad_norm: bool = True,
        update: str = "auto",
    ):
        loss = _losses.cross_entropy if loss is None else loss
        self.be = be = _select_backend(backend)
        self.model = model
        self.loss_fn = _grad.supervised(model, loss)
        self.estimator = est = _grad.estimator(estimator) if isinstance(estimator, str) else estimator
        self.optimizer = _optim.sgd(0.05) if optimizer is None else optimizer
        self.grad_norm = bool(grad_norm)
        self.train_mode = bool(getattr(model, "has_train_mode", False))
        self.state_names = tuple(model.initial_state()) if getattr(model, "has_state", False) else ()
        self._compile, self._update = compile, choose_update(self.optimizer, est, update, be=be)
        self._steps: dict = {}  # data-parallel steps, built once per collective
        self.step = self.build_step()
        self.update_strategy = self.step.strategy
        # a loss with a reduction argument gives the evaluation's summed loss (decided once)
        self._loss_sum = _losses.get(loss) if _takes_reduction(loss) else None
        self._measure = _grad.with_diagnostics(est)
        jit_kw = {} if compile is None else {"compile": bool(compile)}
        self.diagnose = be.jit(self._diagnose, **jit_kw)
        self.evaluate_batch = be.jit(self._evaluate_batch, **jit_kw)

    def _diagnose(self, params, x, y, key):
        """The estimate next to the true gradient (``cosine``, ``rel_norm``), outside the timed step."""
        params, _ = self.split_state(params)
        batch = model_batch(self.be, x, y, key, self.train_mode)
        return self._measure(self.loss_fn, params, batch, key)[2]

    def build_step(self, *, collective=None, return_estimate: bool = False):
        """This Trainer's step built by :func:`duogard.step.build_step` (the one step builder):
        its estimator, update strategy, training mode and state, with an optional ``collective``
        (a data-parallel run's reduce part; the step is then built once per collective and kept).
        """
        cache = getattr(collective, "cache_key", collective)
        if collective is not None and cache in self._steps:
            return self._steps[cache]
        step = build_step(
            self.be,
            self.loss_fn,
            self.estimator,
            self.optimizer,
            update=self._update,
            train_mode=self.train_mode,
            state=(self.model, self.state_names) if self.state_names else None,
            collective=collective,
            grad_norm=self.grad_norm,
            compile=self._compile,
            return_estimate=return_estimate,
        )
        if collective is not None:
            self._steps[cache] = step
        return step

    def split_state(self, params):
        """``(trainable, state)``: the model's state entries (:attr:`state_names`: batch norm's
        running statistics) taken out of a flat ``params`` dict; ``state`` is empty for a
        stateless model.
        """
        return split_state(params, self.state_names)

    def _evaluate_batch(self, params, x, y):
        """The summed loss (None without a reduction argument) and the correct count (None for
        non-class targets) of one batch.
        """
        xp = self.be.xp
        logits = self.model.apply(params, x)
        total = self._loss_sum(logits, y, reduction="sum") if self._loss_sum is not None else None
        classes = y.ndim == 1 and not xp.isdtype(y.dtype, "real floating")
        correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == y, xp.int32)) if classes else None
        return total, correct

    def compiles(self) -> int | None:
        """How many times the step was compiled (None where the backend does not count)."""
        return self.step.compiles()

    def init_state(self, params):
        """Params on this backend (from NumPy or either framework) and the optimizer state.

        Args:
            params: the initial params (never modified: they are copied once).

        Returns:
            ``(params, opt_state)``, owned by this Trainer.

        Raises:
            TypeError: float64 params on JAX with its 64-bit mode off (JAX would silently
                train in float32).
        """
        be = self.be
        if self.state_names:  # the model's state rides in params (initial values where missing)
            params = {**self.model.initial_state(), **params}
        params = tree_map(lambda a: on_backend(be, a, "Trainer.init_state: params"), params)
        params = tree_map(lambda a: be.xp.asarray(a, copy=True) if be.is_array(a) else a, params)

        # placed explicitly (committed, on JAX) like the step's outputs, so the step compiles once
        def place(a):
            return be.asarray(a, device=be.default_device()) if be.is_array(a) else a

        return tree_map(place, params), tree_map(place, self.optimizer.init(self.split_state(params)[0]))

    def evaluate(self, params, x, y, *, batch_size: int = 512) -> dict:
        """Mean loss and accuracy over ``(x, y)`` (NumPy or backend arrays).

        Args:
            params: the params.
            x: the inputs.
            y: the targets.
            batch_size: evaluated this many examples at a time.

        Returns:
            ``{"loss": ..., "accuracy": ...}`` (loss NaN for a loss without a reduction argument).
        """
        total, correct, n = 0.0, 0, int(x.shape[0])
        for start in range(0, n, batch_size):
            xb = self.be.asarray(x[start : start + batch_size])
            yb = self.be.asarray(y[start : start + batch_size])
            s, c = self.evaluate_batch(params, xb, yb)
            total += float(s) if s is not None else float("nan")
            correct += int(c) if c is not None else 0
        return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}


def on_backend(be, a, what: str):
    """``a`` as an array of ``be``; a NumPy float keeps its dtype, so JAX without 64-bit mode
    refuses float64 (TypeError saying how to enable it) instead of silently using float32.
    """
    if not isinstance(a, (np.ndarray, np.generic)) or a.dtype.kind not in "fc":
        return be.asarray(a)
    try:
        return be.asarray(a, dtype=a.dtype.name)
    except TypeError as exc:
        raise TypeError(
            f"{what} are {a.dtype.name}, which {be.name} cannot hold now: {exc}. Call "
            f"duogard.backend({be.name!r}).enable_float64() before making arrays, or cast to float32"
        ) from None


def _takes_reduction(loss) -> bool:
    try:
        return "reduction" in inspect.signature(_losses.get(loss)).parameters
    except (TypeError, ValueError):
        return False
