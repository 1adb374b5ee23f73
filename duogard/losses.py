"""Pure losses, written once against the backend contract.

Each takes predictions first and targets second, and reduces with ``reduction="mean"``
(the default, as in torch), ``"sum"`` or ``"none"`` (unreduced: one value per example for the
classification losses, one per element for the elementwise ones, as in torch). All are
numerically stable (log-sum-exp, log1p). A shape mismatch raises ValueError naming both
shapes; an integer label outside ``[0, C)`` raises ValueError (or, traced inside a compiled or
vectorised function, makes that example's loss NaN) instead of counting as 0.
"""

from __future__ import annotations

import numpy as np

from duogard.backend import backend_of

__all__ = ["cross_entropy", "nll_loss", "mse", "l1", "binary_cross_entropy_with_logits", "LOSSES", "get"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(be, values, reduction: str, fn: str):
    if reduction == "mean":
        return be.xp.mean(values)
    if reduction == "sum":
        return be.xp.sum(values)
    if reduction == "none":
        return values
    raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _is_int(be, x) -> bool:
    return not be.xp.isdtype(x.dtype, ("real floating", "complex floating"))


def _check_labels(be, fn: str, logits, labels) -> None:
    if logits.ndim < 1:
        raise ValueError(f"{fn}: expected logits of shape (N, C) or (C,), got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{fn}: integer labels must have shape {tuple(logits.shape[:-1])} for logits of shape "
            f"{tuple(logits.shape)}, got labels of shape {tuple(labels.shape)}"
        )


def _valid_labels(be, fn: str, labels, num_classes: int):
    """Refuse integer labels outside ``[0, num_classes)``, which would silently count as 0.

    Concrete labels are checked here (ValueError naming the first bad one). Traced ones
    (inside ``jax.jit``, a vmap, ``torch.compile``) cannot be: their validity mask comes back,
    and the caller makes those rows' losses NaN so a training run's non-finite check stops.
    Returns None when the labels were checked.
    """
    xp = be.xp
    valid = xp.logical_and(labels >= 0, labels < num_classes)
    if be.is_tracing(valid):  # not labels: inside jax.jit even ops on constants are traced
        return valid
    if not bool(xp.all(valid)):
        where = tuple(int(i) for i in np.argwhere(~np.asarray(be.to_numpy(valid)))[0])
        bad = np.asarray(be.to_numpy(labels))[where]
        at = where[0] if len(where) == 1 else where
        raise ValueError(f"{fn}: labels must be in [0, {num_classes}), got {bad} (at index {at})")
    return None


def _nll_values(be, fn: str, log_probs, labels):
    """``be.nll_values``, with a label outside ``[0, C)`` named in a ValueError (traced: NaN rows)."""
    try:
        return be.nll_values(log_probs, labels)
    except IndexError:
        _valid_labels(be, fn, labels, log_probs.shape[-1])  # raises, naming the first bad label
        raise


def _poison(be, values, valid):
    """``values`` with NaN where ``valid`` (None: all valid) is false."""
    if valid is None:
        return values
    return be.xp.where(valid, values, be.xp.full_like(values, float("nan")))


def _targets_from(be, fn: str, logits, targets, label_smoothing: float):
    """Class indices or probabilities -> a probability matrix like ``logits``."""
    xp = be.xp
    if logits.ndim < 1:
        raise ValueError(f"{fn}: expected logits of shape (N, C) or (C,), got {tuple(logits.shape)}")
    num_classes = logits.shape[-1]
    if _is_int(be, targets):
        _check_labels(be, fn, logits, targets)
        classes = xp.arange(num_classes, device=be.device_of(logits))
        probs = xp.astype(targets[..., None] == classes, logits.dtype)
    else:
        if tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(
                f"{fn}: probability targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        probs = targets
    if label_smoothing:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
        probs = probs * (1.0 - label_smoothing) + label_smoothing / num_classes
    return probs


def _neg_weighted_sum(be, weights, log_probs, integer_labels: bool):
    """``-sum(weights * log_probs)`` over the last axis. With integer labels a class of weight 0
    adds nothing even where its log-probability is -inf (masked logits), as in torch.
    """
    terms = weights * log_probs
    if integer_labels:
        terms = be.xp.where(weights > 0, terms, be.xp.zeros_like(terms))
    return -be.xp.sum(terms, axis=-1)


def cross_entropy(logits, targets, *, reduction: str = "mean", label_smoothing: float = 0.0, axis: int = -1):
    """Softmax cross-entropy from logits (``torch.nn.functional.cross_entropy``).

    ``targets`` are integer class labels (shape ``logits.shape[:-1]``) or class
    probabilities (the logits' shape); ``label_smoothing`` mixes in the uniform distribution
    as torch does.
    """
    be = backend_of(logits)
    if axis not in (-1, logits.ndim - 1):
        logits = be.xp.moveaxis(logits, axis, -1)
        if not _is_int(be, targets):
            targets = be.xp.moveaxis(targets, axis, -1)
    if _is_int(be, targets) and not label_smoothing:
        # integer labels: select each target's log-probability (one gather on torch, which
        # checks the labels; the one-hot product below gives the same numbers in more ops, each
        # paid again under forward-mode AD)
        _check_labels(be, "cross_entropy", logits, targets)
        values = _nll_values(be, "cross_entropy", be.log_softmax(logits, axis=-1), targets)
        return _reduce(be, values, reduction, "cross_entropy")
    probs = _targets_from(be, "cross_entropy", logits, targets, label_smoothing)
    integer = _is_int(be, targets)
    valid = _valid_labels(be, "cross_entropy", targets, logits.shape[-1]) if integer else None
    values = _neg_weighted_sum(be, probs, be.log_softmax(logits, axis=-1), integer)
    return _reduce(be, _poison(be, values, valid), reduction, "cross_entropy")


def nll_loss(log_probs, labels, *, reduction: str = "mean"):
    """Negative log-likelihood of integer ``labels`` under ``log_probs`` (``F.nll_loss``)."""
    be = backend_of(log_probs)
    if not _is_int(be, labels):
        raise ValueError(f"nll_loss: labels must be integers, got dtype {labels.dtype}")
    probs = _targets_from(be, "nll_loss", log_probs, labels, 0.0)
    valid = _valid_labels(be, "nll_loss", labels, log_probs.shape[-1])
    values = _poison(be, _neg_weighted_sum(be, probs, log_probs, True), valid)
    return _reduce(be, values, reduction, "nll_loss")


def _check_same(fn: str, pred, target) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"{fn}: predictions of shape {tuple(pred.shape)} and targets of shape "
            f"{tuple(target.shape)} differ"
        )


def mse(pred, target, *, reduction: str = "mean"):
    """Mean squared error (``F.mse_loss``)."""
    _check_same("mse", pred, target)
    be = backend_of(pred)
    return _reduce(be, be.xp.square(pred - target), reduction, "mse")


def l1(pred, target, *, reduction: str = "mean"):
    """Mean absolute error (``F.l1_loss``)."""
    _check_same("l1", pred, target)
    be = backend_of(pred)
    diff = pred - target
    # |d| as d * sign(d): the same value, with torch's subgradient 0 at d = 0 (JAX's abs has 1)
    return _reduce(be, diff * be.xp.sign(diff), reduction, "l1")


def binary_cross_entropy_with_logits(logits, targets, *, reduction: str = "mean"):
    """Binary cross-entropy from logits, stable (``F.binary_cross_entropy_with_logits``)."""
    _check_same("binary_cross_entropy_with_logits", logits, targets)
    be = backend_of(logits)
    xp = be.xp
    # max(x, 0) as (x + |x|) / 2 (the same value, exactly): at x = 0 its derivative then sums with
    # log1p(exp(-|x|))'s to sigmoid(0) = 1/2 whatever |x|'s derivative at 0 is (1 in JAX, 0 in
    # torch); with maximum, JAX's gradient at x = 0 was -t instead of 1/2 - t
    values = 0.5 * (logits + xp.abs(logits)) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits)))
    return _reduce(be, values, reduction, "binary_cross_entropy_with_logits")


LOSSES = {
    "cross_entropy": cross_entropy,
    "nll": nll_loss,
    "mse": mse,
    "l1": l1,
    "bce_with_logits": binary_cross_entropy_with_logits,
}


def get(name):
    """A loss by name (or a callable, returned as is)."""
    if callable(name):
        return name
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss: unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
