"""Learning-rate schedules: callables ``step -> value``, accepted wherever a learning rate is.

``step`` is the number of updates made before this one (0 for the first update). It may be
a Python int (the value comes back as a Python float, NumPy math), or an array of either
framework, also inside ``jax.jit`` (the value comes back as a 0-d array of that framework,
backend math). Optimizers call a schedule with the step count already converted to the
parameters' float dtype, so float64 training gets a float64 learning rate; a bare integer
array is promoted to the framework's default float (float32 on torch).

A negative learning rate is gradient ascent: the schedules here refuse negative values at
construction, and an optimizer refuses a callable that gives a negative (or non-finite) rate
at step 0 (:func:`check_rate_at_zero`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from duogard.backend import backend_of
from duogard.optim._base import as_number, check, nonneg, positive_int

__all__ = [
    "Schedule",
    "constant_schedule",
    "exponential_decay",
    "step_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "as_schedule",
    "check_rate_at_zero",
]

Schedule = Callable[[object], object]

_SCALARS = (int, float, np.integer, np.floating)


def _float_step(step):
    """``(step as a float scalar/array, its array namespace, scalar_in)``."""
    if isinstance(step, bool):
        raise TypeError(f"schedule: step must be an int or an integer/float array, got {step!r}")
    if isinstance(step, _SCALARS + (np.ndarray,)):
        return np.asarray(step, dtype=np.float64), np, isinstance(step, _SCALARS)
    be = backend_of(step)
    xp = be.xp
    if not xp.isdtype(step.dtype, "real floating"):
        step = step * 1.0
    return step, xp, False


def _finish(value, scalar_in: bool):
    return float(value) if scalar_in else value


def constant_schedule(value) -> Schedule:
    """``value`` (>= 0: a learning rate) at every step (a Python float)."""
    v = nonneg("constant_schedule", "value", value)

    def schedule(step):
        return v

    return schedule


def exponential_decay(init_value, *, rate) -> Schedule:
    """``init_value * exp(-rate * step)``: the schedule of Baydin et al. (2022) and fwdgrad.

    The same as ``torch.optim.lr_scheduler.ExponentialLR(gamma=exp(-rate))`` stepped once per
    update. (optax's ``exponential_decay`` has other arguments: ``transition_steps`` and
    ``decay_rate``.)
    """
    v = nonneg("exponential_decay", "init_value", init_value)
    k = nonneg("exponential_decay", "rate", rate)

    def schedule(step):
        s, xp, scalar = _float_step(step)
        return _finish(v * xp.exp(-k * s), scalar)

    return schedule


def step_decay(init_value, *, step_size: int, gamma=0.1) -> Schedule:
    """``init_value * gamma ** floor(step / step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""
    v = nonneg("step_decay", "init_value", init_value)
    size = positive_int("step_decay", "step_size", step_size)
    g = nonneg("step_decay", "gamma", gamma)

    def schedule(step):
        s, xp, scalar = _float_step(step)
        return _finish(v * g ** xp.floor(s / size), scalar)

    return schedule


def cosine_decay(init_value, *, decay_steps: int, alpha=0.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps``,
    then constant.

    Equals ``optax.cosine_decay_schedule`` and, up to ``decay_steps``,
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps, eta_min=alpha*init_value)``
    (torch goes back up after ``T_max``; this stays at the floor, as optax does).
    """
    v = nonneg("cosine_decay", "init_value", init_value)
    n = positive_int("cosine_decay", "decay_steps", decay_steps)
    a = as_number("cosine_decay", "alpha", alpha)
    check("cosine_decay", "alpha", alpha, 0.0 <= a <= 1.0, "in [0, 1]")

    def schedule(step):
        s, xp, scalar = _float_step(step)
        cosine = 0.5 * (1.0 + xp.cos(math.pi * xp.minimum(s, float(n)) / n))
        return _finish(v * ((1.0 - a) * cosine + a), scalar)

    return schedule


def warmup_cosine_decay(
    peak_value, *, warmup_steps: int, decay_steps: int, init_value=0.0, end_value=0.0
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then half a
    cosine down to ``end_value`` at step ``decay_steps`` (the total, warmup included), then
    constant. Equals ``optax.warmup_cosine_decay_schedule``.
    """
    fn = "warmup_cosine_decay"
    peak = nonneg(fn, "peak_value", peak_value)
    warm = positive_int(fn, "warmup_steps", warmup_steps, allow_zero=True)
    total = positive_int(fn, "decay_steps", decay_steps)
    check(fn, "decay_steps", decay_steps, total > warm, f"> warmup_steps ({warm})")
    start = nonneg(fn, "init_value", init_value)
    end = nonneg(fn, "end_value", end_value)
    length = total - warm

    def schedule(step):
        s, xp, scalar = _float_step(step)
        ramp = start + (peak - start) * s / max(warm, 1)
        t = xp.minimum(xp.maximum(s - warm, 0.0), float(length)) / length
        cosine = end + (peak - end) * 0.5 * (1.0 + xp.cos(math.pi * t))
        return _finish(xp.where(s < warm, ramp, cosine), scalar)

    return schedule


def check_rate_at_zero(fn: str, value) -> None:
    """ValueError unless a schedule's rate at step 0 (a number or a concrete 0-d array) is a
    finite number >= 0: a negative rate would silently run gradient ascent.
    """
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{fn}: learning_rate schedule gave {v!r} at step 0; expected a finite number >= 0")


def as_schedule(fn: str, learning_rate) -> Schedule:
    """A schedule from a learning rate: a number (checked >= 0) or a callable.

    A callable is probed at step 0 (a Python int) and refused when it gives a negative or
    non-finite rate; one that cannot take a Python int is checked when the optimizer state is
    made (``init``).
    """
    if callable(learning_rate):
        try:
            first = float(learning_rate(0))
        except Exception:  # a schedule written for arrays only: checked by init
            first = None
        if first is not None:
            check_rate_at_zero(fn, first)
        return learning_rate
    try:
        lr = nonneg(fn, "learning_rate", learning_rate)
    except TypeError:
        raise TypeError(
            f"{fn}: learning_rate must be a number >= 0 or a schedule (a callable step -> value), "
            f"got {learning_rate!r}"
        ) from None
    return constant_schedule(lr)
