"""The optimizers: chains of the small transformations, with torch.optim's semantics.

Hyperparameters and defaults are torch.optim's (names of the Adam betas are optax's ``b1``,
``b2``), so a torch training script ports number for number. Where optax differs, the
docstring says how and which optax options give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from duogard.backend import backend_of
from duogard.optim._base import GradientTransformation, chain, check, nonneg, positive, unit_interval
from duogard.optim._schedules import as_schedule
from duogard.optim._transforms import (
    ScaleByLearningRateState,
    add_decayed_weights,
    rate_at,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    trace,
)
from duogard.tree import Rank1, tree_map

__all__ = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "PlainSGD"]


def _chain(*parts) -> GradientTransformation:
    return chain(*(p for p in parts if p is not None))


def sgd(
    learning_rate=1e-3, *, momentum=0.0, nesterov: bool = False, weight_decay=0.0
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (``dampening=0``).

    ``g += weight_decay * param``; with momentum ``buf = momentum * buf + g`` (``buf = g`` at
    the first step) and the step is ``-lr * buf`` (``-lr * (g + momentum * buf)`` with
    ``nesterov``). optax: ``chain(add_decayed_weights(weight_decay), optax.sgd(lr, momentum,
    nesterov))`` is the same.

    Args:
        learning_rate: a number >= 0 or a schedule (``step -> rate``).
        momentum: the momentum factor (0: none).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty added to the gradient.

    Returns:
        A :class:`GradientTransformation`; without momentum a :class:`PlainSGD`, which a
        training step may also apply in place, in one pass (:meth:`PlainSGD.apply_`).
    """
    schedule = as_schedule("sgd", learning_rate)
    m = nonneg("sgd", "momentum", momentum)
    wd = nonneg("sgd", "weight_decay", weight_decay)
    check("sgd", "nesterov", nesterov, not nesterov or m > 0, "False when momentum is 0")
    tx = _chain(
        add_decayed_weights(wd) if wd else None,
        trace(decay=m, nesterov=bool(nesterov)) if m else None,
        scale_by_learning_rate(schedule),
    )
    return tx if m else PlainSGD(tx.init, tx.update, schedule=schedule, weight_decay=wd)


class PlainSGD(GradientTransformation):
    """A momentum-free :func:`sgd`: still a ``GradientTransformation`` (``init``, ``update``),
    and also the one component that applies an SGD step in place.

    ``params <- params * (1 - lr * weight_decay) - lr * g``. Training steps that fuse the
    update with the gradient computation (the Trainer's in-place, factored and lean update
    strategies) read the rate with :meth:`advance` and write each leaf with :meth:`apply_`, so
    the numbers are the same whichever strategy runs.

    Attributes:
        schedule: the learning-rate schedule (``count -> rate``).
        weight_decay: the L2 penalty (0: none).
    """

    def __new__(cls, init, update, *, schedule: Callable[[Any], Any], weight_decay: float):
        self = super().__new__(cls, init, update)
        self.schedule = schedule
        self.weight_decay = float(weight_decay)
        return self

    def __repr__(self) -> str:
        return f"PlainSGD(weight_decay={self.weight_decay})"

    def advance(self, state):
        """The rate of this update and the optimizer state after it.

        Args:
            state: the state ``init``/``update`` made.

        Returns:
            ``(learning_rate, new_state)``: a 0-d array and the state one update later,
            exactly as ``update`` would leave it.
        """
        lr_state = state[-1]  # sgd's chain ends with scale_by_learning_rate
        lr = lr_state.learning_rate
        count = lr_state.count + 1  # what scale_by_learning_rate's update leaves, without its updates
        new = ScaleByLearningRateState(count, rate_at(backend_of(lr), self.schedule, count, lr.dtype))
        return lr, (*state[:-1], new)

    def apply_(self, be, param, grad, lr, *, scale=None, where=None):
        """One leaf's step, in place where the backend can (torch; donated buffers under jit).

        ``param * (1 - lr * weight_decay) - lr * scale * grad``, in two in-place passes
        (weight decay first), or one without weight decay.

        Args:
            be: the backend of ``param``.
            param: the leaf to update (owned by the caller: it may be overwritten).
            grad: the gradient leaf, or the tangent ``v`` of a factored estimate ``d v`` (an
                array, or a :class:`duogard.tree.Rank1` with K = 1 for a rank-1 tangent).
            lr: the learning rate (0-d array or number).
            scale: ``d`` of a factored estimate (0-d array), or None.
            where: a 0-d bool: update only where it holds (None: always).

        Returns:
            The updated leaf (the same buffer on torch).
        """
        return self._apply(be, param, grad, lr, self._coefficient(be, lr, param.dtype, scale), where)

    def apply_tree_(self, be, params, grads, lr, *, scale=None, where=None):
        """:meth:`apply_` over every leaf of ``params`` (the same numbers), with the step's own
        work done once, not per leaf: the coefficient ``-lr·scale`` per dtype, and, outside a
        traced program, ``where`` decided on the host (nothing is written when it is false).

        Returns:
            The updated params (the same buffers on torch).
        """
        if isinstance(where, bool) or (where is not None and not be.is_tracing(where)):
            if not bool(where):
                return params
            where = None
        one = self.updater(be, lr, scale=scale)
        return tree_map(lambda param, grad: one(param, grad, where), params, grads)

    def updater(self, be, lr, *, scale=None):
        """:meth:`apply_` for the leaves of one step, the coefficient ``-lr·scale`` computed once
        per dtype (the same numbers): ``update(param, grad, where=None) -> param``, for a step
        that meets its leaves one at a time (``update="sgd-in-backward"``).
        """
        coefs: dict = {}

        def one(param, grad, where=None):
            coef = coefs.get(param.dtype)
            if coef is None:
                coef = coefs[param.dtype] = self._coefficient(be, lr, param.dtype, scale)
            return self._apply(be, param, grad, lr, coef, where)

        return one

    @staticmethod
    def _coefficient(be, lr, dtype, scale):
        """``-lr`` (times ``scale``, a factored estimate's ``d``) in the leaf's dtype."""
        xp = be.xp
        coef = -xp.astype(lr, dtype)
        return coef if scale is None else coef * xp.astype(scale, dtype)

    def _apply(self, be, param, grad, lr, coef, where):
        if self.weight_decay:
            decay = -be.xp.astype(lr, param.dtype) * self.weight_decay
            param = be.add_scaled_(param, param, decay, where=where)
        if isinstance(grad, Rank1):  # a rank-1 tangent u wᵀ (K = 1): a rank-1 update, no u wᵀ array
            return be.add_outer_(param, grad.u[0], grad.w[0], coef, where=where)
        return be.add_scaled_(param, grad, coef, where=where)


def _adam_args(fn, b1, b2, eps, weight_decay):
    return (
        unit_interval(fn, "b1", b1),
        unit_interval(fn, "b2", b2),
        positive(fn, "eps", eps),
        nonneg(fn, "weight_decay", weight_decay),
    )


def adam(learning_rate=1e-3, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam``: ``-lr * m_hat / (sqrt(v_hat) + eps)``.

    ``weight_decay`` is torch's L2 term, added to the gradient before the moments (for the
    decoupled decay use :func:`adamw`). ``optax.adam(lr, b1, b2, eps)`` (``eps_root=0``)
    computes the same expression; eps sits outside the square root in both. (Keras/TF's
    "epsilon hat" form differs.)
    """
    b1, b2, eps, wd = _adam_args("adam", b1, b2, eps, weight_decay)
    return _chain(
        add_decayed_weights(wd) if wd else None,
        scale_by_adam(b1=b1, b2=b2, eps=eps),
        scale_by_learning_rate(as_schedule("adam", learning_rate)),
    )


def adamw(learning_rate=1e-3, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW``: Adam's step plus the decoupled decay ``-lr * wd * param``.

    ``optax.adamw(lr, b1, b2, eps, weight_decay=wd)`` is the same (its default ``weight_decay``
    is 1e-4; torch's, and this one's, 1e-2). The decay applies to every leaf (no mask).
    """
    b1, b2, eps, wd = _adam_args("adamw", b1, b2, eps, weight_decay)
    return _chain(
        scale_by_adam(b1=b1, b2=b2, eps=eps),
        add_decayed_weights(wd) if wd else None,
        scale_by_learning_rate(as_schedule("adamw", learning_rate)),
    )


def rmsprop(
    learning_rate=1e-2, *, alpha=0.99, eps=1e-8, momentum=0.0, centered: bool = False, weight_decay=0.0
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop``: ``g / (sqrt(v) + eps)`` (centered:
    ``sqrt(v - m**2)``), then momentum ``buf = momentum * buf + that``, step ``-lr * buf``.

    optax.rmsprop differs by default: eps inside the square root (``eps_in_sqrt=False`` gives
    torch's), decay 0.9 (torch's ``alpha`` 0.99), and its momentum accumulates ``lr * g``
    rather than ``g``: the same numbers for a constant learning rate, not under a schedule.
    This follows torch.
    """
    fn = "rmsprop"
    a, eps = unit_interval(fn, "alpha", alpha), positive(fn, "eps", eps)
    m, wd = nonneg(fn, "momentum", momentum), nonneg(fn, "weight_decay", weight_decay)
    return _chain(
        add_decayed_weights(wd) if wd else None,
        scale_by_rms(alpha=a, eps=eps, centered=bool(centered)),
        trace(decay=m) if m else None,
        scale_by_learning_rate(as_schedule(fn, learning_rate)),
    )


def adagrad(
    learning_rate=1e-2, *, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad``: step ``-lr_t * g / (sqrt(s) + eps)`` with
    ``s = initial_accumulator_value + sum of g**2`` and ``lr_t = lr / (1 + t * lr_decay)`` at
    the ``t``-th update (from 0).

    optax.adagrad differs: eps inside the square root (``g / sqrt(s + eps)``), default
    ``initial_accumulator_value=0.1`` (torch: 0) and no ``lr_decay`` (pass the schedule
    ``lambda t: lr / (1 + t * lr_decay)``). This follows torch.
    """
    fn = "adagrad"
    base = as_schedule(fn, learning_rate)
    decay = nonneg(fn, "lr_decay", lr_decay)
    wd = nonneg(fn, "weight_decay", weight_decay)
    acc0 = nonneg(fn, "initial_accumulator_value", initial_accumulator_value)
    eps = positive(fn, "eps", eps)
    schedule = (lambda step: base(step) / (1.0 + decay * step)) if decay else base
    return _chain(
        add_decayed_weights(wd) if wd else None,
        scale_by_rss(initial_accumulator_value=acc0, eps=eps),
        scale_by_learning_rate(schedule),
    )
