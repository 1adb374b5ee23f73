"""A supervised objective: a model and a loss, as a ``loss_fn(params, batch)``."""

from __future__ import annotations

from collections.abc import Callable

from duogard import losses as _losses

__all__ = ["MODEL_KEY", "RULE_LOSSES", "Batch", "Supervised", "model_batch", "supervised"]

#: A training step's model key (dropout masks) is ``fold_in(step_key, MODEL_KEY)``: a stream of
#: its own, apart from the tangents' draws (which take ``split`` and small ``fold_in`` indices of
#: the step key), the same on every backend.
MODEL_KEY = 0x6D6F6465  # "mode"


class Batch(tuple):
    """The batch a training step's loss sees, with its parts named: :attr:`inputs`,
    :attr:`targets` and :attr:`model_key`.

    It is a tuple, ``(inputs, targets)``, or ``(inputs, targets, model_key)`` for a model with
    a training mode (then the loss runs it with ``train=True`` and that key: dropout masks; see
    :class:`duogard.grad.Supervised`), so a loss written for ``x, y = batch`` keeps working.
    """

    __slots__ = ()

    def __new__(cls, inputs, targets, model_key=None):
        return tuple.__new__(cls, (inputs, targets) if model_key is None else (inputs, targets, model_key))

    @property
    def inputs(self):
        """The model's inputs ``x``."""
        return self[0]

    @property
    def targets(self):
        """The targets ``y``."""
        return self[1]

    @property
    def model_key(self):
        """The key of the model's training-mode randomness (dropout), or None (evaluation mode)."""
        return self[2] if len(self) == 3 else None

    def __repr__(self) -> str:
        key = self.model_key is not None
        return f"Batch(inputs={_shape(self[0])}, targets={_shape(self[1])}, model_key={key})"


def _shape(a) -> str:
    return f"<{getattr(a, 'dtype', type(a).__name__)}{tuple(getattr(a, 'shape', ()))}>"


def model_batch(be, x, y, key, train_mode: bool) -> Batch:
    """The :class:`Batch` of a training step: with the model key ``fold_in(key, MODEL_KEY)`` for a
    model with a training mode.
    """
    return Batch(x, y, be.fold_in(key, MODEL_KEY) if train_mode else None)


#: The losses that duogard's hand-written forward rules cover (:mod:`duogard.grad._rules`).
RULE_LOSSES = ("cross_entropy", "mse")


class Supervised:
    """``loss_fn(params, batch) = loss(model.apply(params, x), y)`` for ``batch = (x, y)``.

    Estimators that need the model's structure (``forward-activity``) read ``.model`` and
    ``.loss``; every other estimator just calls it. ``batch`` may carry a third item, a
    random key for dropout (then the model runs with ``train=True``). The objective says
    whether duogard's hand-written forward rules may serve it (:attr:`loss_rule`).

    Args:
        model: the model.
        loss: the loss function or its name.
        forward_rules: let estimators use duogard's forward rules where they cover the model
            and the loss (default True); False keeps the framework's jvp for this objective.
    """

    def __init__(self, model, loss: Callable | str = _losses.cross_entropy, *, forward_rules: bool = True):
        if not isinstance(forward_rules, bool):
            raise TypeError(f"supervised: forward_rules must be True or False, got {forward_rules!r}")
        self.model = model
        self.loss = _losses.get(loss)
        self.forward_rules = forward_rules

    @property
    def loss_rule(self) -> str | None:
        """The name of the hand-written forward rule of this objective's loss (one of
        :data:`RULE_LOSSES`), or None: the loss has none, or ``forward_rules=False``.
        """
        if not self.forward_rules:
            return None
        return next((name for name in RULE_LOSSES if self.loss is _losses.get(name)), None)

    def __call__(self, params, batch):
        x, y, key = _unpack(batch)
        out = self.model.apply(params, x, key=key, train=key is not None)
        return self.loss(out, y)

    def __repr__(self) -> str:
        return f"supervised({self.model!r}, {getattr(self.loss, '__name__', self.loss)!r})"


def _unpack(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            f"supervised loss: batch must be (x, y) or (x, y, key), got "
            f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
        )
    x, y, *rest = batch
    return x, y, rest[0] if rest else None


def supervised(
    model, loss: Callable | str = _losses.cross_entropy, *, forward_rules: bool = True
) -> Supervised:
    """Make ``loss_fn(params, (x, y))`` from a model and a loss (default: softmax cross-entropy);
    ``forward_rules=False`` keeps estimators on the framework's jvp for it.
    """
    return Supervised(model, loss, forward_rules=forward_rules)
