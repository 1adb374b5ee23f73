"""Small gradient transformations; the optimizers are chains of these.

Each is written once against the backend contract (``be.xp`` math on the leaves' own
framework), keeps its state as a NamedTuple of arrays, and works under ``jax.jit`` and
eagerly on torch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from duogard.optim._base import (
    EmptyState,
    GradientTransformation,
    array_backend,
    as_number,
    float_dtype,
    nonneg,
    positive,
    unit_interval,
)
from duogard.optim._schedules import as_schedule, check_rate_at_zero
from duogard.tree import tree_leaves, tree_map

__all__ = [
    "ScaleByLearningRateState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "scale",
    "scale_by_learning_rate",
    "rate_at",
    "add_decayed_weights",
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
    "clip",
    "clip_by_global_norm",
]


class ScaleByLearningRateState(NamedTuple):
    count: Any  #: updates made so far (0-d int32 array)
    learning_rate: Any  #: the rate the next update uses (0-d array, the params' float dtype)


class TraceState(NamedTuple):
    trace: Any


class ScaleByAdamState(NamedTuple):
    count: Any
    mu: Any
    nu: Any


class ScaleByRmsState(NamedTuple):
    nu: Any  #: running mean of squared gradients
    mu: Any  #: running mean of gradients (centered only; None otherwise)


class ScaleByRssState(NamedTuple):
    sum_of_squares: Any


def _zero_count(be):
    # Scalars live on the default device (torch: the CPU, like torch.optim's ``step``; a 0-d CPU
    # tensor mixes with CUDA tensors). On JAX this keeps them uncommitted: a committed array
    # among uncommitted params would make the second call of a jitted step compile again.
    return be.xp.zeros((), dtype=be.int32)


def _zeros_like(tree):
    be = array_backend("init", tree)
    return tree_map(be.xp.zeros_like, tree)


def scale(factor) -> GradientTransformation:
    """Multiply the updates by a constant ``factor``."""
    f = as_number("scale", "factor", factor)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return tree_map(lambda u: f * u, updates), state

    return GradientTransformation(init, update)


def rate_at(be, schedule, count, dtype):
    """``schedule(count)`` as a 0-d array of ``dtype`` (on ``count``'s device)."""
    value = schedule(be.xp.astype(count, dtype))
    if be.is_array(value):
        return be.xp.astype(value, dtype)
    return be.xp.asarray(value, dtype=dtype)


def scale_by_learning_rate(learning_rate) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (a number >= 0 or a schedule).

    The state keeps the step count and the rate the next update will use, which
    :func:`current_learning_rate` reads.
    """
    schedule = as_schedule("scale_by_learning_rate", learning_rate)

    def init(params):
        be = array_backend("scale_by_learning_rate.init", params)
        leaves = tree_leaves(params)
        count = _zero_count(be)
        lr = rate_at(be, schedule, count, float_dtype(be, leaves))
        if not be.is_tracing(lr):  # the rate of the first update: a negative one would ascend
            check_rate_at_zero("scale_by_learning_rate", lr)
        return ScaleByLearningRateState(count, lr)

    def update(updates, state, params=None):
        be = array_backend("scale_by_learning_rate.update", updates)
        xp = be.xp
        lr = state.learning_rate
        updates = tree_map(lambda u: -xp.astype(lr, u.dtype) * u, updates)
        count = state.count + 1
        return updates, ScaleByLearningRateState(count, rate_at(be, schedule, count, lr.dtype))

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates.

    Before the scaling it is torch's L2 ``weight_decay`` (added to the gradient); after it,
    scaled by the learning rate, it is AdamW's decoupled decay ``lr * wd * param``.
    """
    wd = nonneg("add_decayed_weights", "weight_decay", weight_decay)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        if wd == 0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights: update needs params (weight_decay > 0), got None")
        return tree_map(lambda u, p: u + wd * p, updates, params), state

    return GradientTransformation(init, update)


def trace(*, decay, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``buf = decay * buf + g``; the update is ``buf`` (or ``g + decay * buf`` with
    ``nesterov``). The buffer starts at zero, so the first update is ``g``, as in torch.optim.SGD
    (``dampening=0``) and optax.trace.
    """
    m = nonneg("trace", "decay", decay)

    def init(params):
        return TraceState(_zeros_like(params))

    def update(updates, state, params=None):
        buf = tree_map(lambda g, t: g + m * t, updates, state.trace)
        out = tree_map(lambda g, t: g + m * t, updates, buf) if nesterov else buf
        return out, TraceState(buf)

    return GradientTransformation(init, update)


def _one_minus_power(xp, b: float, t):
    """``1 - b**t`` without the cancellation of float32 ``b**t`` near 1: ``-expm1(t log b)``
    with ``log b`` taken in float64 (torch takes the whole bias correction in float64).
    """
    return 1.0 if b == 0 else -xp.expm1(t * math.log(b))


def scale_by_adam(*, b1=0.9, b2=0.999, eps=1e-8) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` with bias-corrected moments.

    eps is added outside the square root of the bias-corrected second moment: torch.optim.Adam
    (``sqrt(v)/sqrt(1 - b2**t) + eps``) and optax.adam (``eps_root=0``) compute this same
    expression, and this is it.
    """
    b1 = unit_interval("scale_by_adam", "b1", b1)
    b2 = unit_interval("scale_by_adam", "b2", b2)
    eps = positive("scale_by_adam", "eps", eps)

    def init(params):
        be = array_backend("scale_by_adam.init", params)
        count = _zero_count(be)
        return ScaleByAdamState(count, _zeros_like(params), _zeros_like(params))

    def update(updates, state, params=None):
        xp = array_backend("scale_by_adam.update", updates).xp
        count = state.count + 1
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * (g * g), updates, state.nu)

        def direction(m, v):
            t = xp.astype(count, m.dtype)
            return (m / _one_minus_power(xp, b1, t)) / (
                xp.sqrt(v) / xp.sqrt(_one_minus_power(xp, b2, t)) + eps
            )

        return tree_map(direction, mu, nu), ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def scale_by_rms(*, alpha=0.99, eps=1e-8, centered: bool = False) -> GradientTransformation:
    """RMSprop's scaling ``g / (sqrt(v) + eps)``, ``v`` the running mean of ``g**2`` (decay
    ``alpha``), centered: ``g / (sqrt(v - m**2) + eps)`` with ``m`` the running mean of ``g``.

    torch.optim.RMSprop's formula, eps outside the square root (optax.scale_by_rms and
    scale_by_stddev put it inside unless ``eps_in_sqrt=False``).
    """
    a = unit_interval("scale_by_rms", "alpha", alpha)
    eps = positive("scale_by_rms", "eps", eps)

    def init(params):
        return ScaleByRmsState(_zeros_like(params), _zeros_like(params) if centered else None)

    def update(updates, state, params=None):
        xp = array_backend("scale_by_rms.update", updates).xp
        nu = tree_map(lambda g, v: a * v + (1 - a) * (g * g), updates, state.nu)
        if centered:
            mu = tree_map(lambda g, m: a * m + (1 - a) * g, updates, state.mu)
            out = tree_map(lambda g, v, m: g / (xp.sqrt(v - m * m) + eps), updates, nu, mu)
        else:
            mu = None
            out = tree_map(lambda g, v: g / (xp.sqrt(v) + eps), updates, nu)
        return out, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


def scale_by_rss(*, initial_accumulator_value=0.0, eps=1e-10) -> GradientTransformation:
    """Adagrad's scaling ``g / (sqrt(s) + eps)``, ``s`` the running sum of ``g**2`` started at
    ``initial_accumulator_value``.

    torch.optim.Adagrad's formula and defaults. optax.scale_by_rss puts eps inside the square
    root (``g / sqrt(s + eps)``) and starts at 0.1.
    """
    init_value = nonneg("scale_by_rss", "initial_accumulator_value", initial_accumulator_value)
    eps = positive("scale_by_rss", "eps", eps)

    def init(params):
        be = array_backend("scale_by_rss.init", params)
        return ScaleByRssState(tree_map(lambda p: be.xp.full_like(p, init_value), params))

    def update(updates, state, params=None):
        xp = array_backend("scale_by_rss.update", updates).xp
        acc = tree_map(lambda g, s: s + g * g, updates, state.sum_of_squares)
        out = tree_map(lambda g, s: g / (xp.sqrt(s) + eps), updates, acc)
        return out, ScaleByRssState(acc)

    return GradientTransformation(init, update)


def clip(max_delta) -> GradientTransformation:
    """Clip every element to ``[-max_delta, max_delta]`` (``torch.nn.utils.clip_grad_value_``,
    ``optax.clip``).
    """
    d = positive("clip", "max_delta", max_delta)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        xp = array_backend("clip.update", updates).xp
        return tree_map(lambda u: xp.clip(u, -d, d), updates), state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm, *, eps=1e-6) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (norm + eps))``, ``norm`` the 2-norm of all of
    them together.

    ``eps=1e-6`` is ``torch.nn.utils.clip_grad_norm_``'s; ``eps=0`` gives
    ``optax.clip_by_global_norm``.
    """
    m = positive("clip_by_global_norm", "max_norm", max_norm)
    e = nonneg("clip_by_global_norm", "eps", eps)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        be = array_backend("clip_by_global_norm.update", updates)
        xp = be.xp
        leaves = tree_leaves(updates)
        dtype = float_dtype(be, leaves)
        norm = xp.sqrt(sum(xp.astype(xp.sum(u * u), dtype) for u in leaves))
        coef = xp.minimum(m / (norm + e), 1.0)
        return tree_map(lambda u: u * xp.astype(coef, u.dtype), updates), state

    return GradientTransformation(init, update)
