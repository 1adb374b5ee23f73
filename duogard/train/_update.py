"""The update strategies: how a training step turns an estimate into new parameters.

The Trainer picks one strategy once, from the optimizer and the estimator it was given
(:func:`choose_update`), and names it (``Trainer.update_strategy``, ``FitResult.update_strategy``):

- ``"optimizer"``: any optimizer: ``updates, state = opt.update(grads, state, params)`` and
  ``apply_updates`` (new arrays).
- ``"sgd-in-place"``: a momentum-free :func:`duogard.optim.sgd` (:class:`~duogard.optim.PlainSGD`)
  with any estimator: each leaf is updated in one pass, in place on torch and into the donated
  buffer on JAX, by :meth:`PlainSGD.apply_ <duogard.optim.PlainSGD.apply_>`.
- ``"sgd-factored"``: the same optimizer with a forward gradient of one tangent, whose estimate
  is ``d v`` (:attr:`duogard.grad.Forward.factored_form`): ``p -= lr d v`` through the same
  ``apply_``, so the gradient array ``d v`` is never written.
- ``"sgd-lean"``: the same optimizer with ``estimator("forward", lean=True)``: the layer-by-layer
  step of :class:`duogard.grad.LeanStep`, whose per-leaf update is that same ``apply_``.

Every SGD strategy gives the numbers of ``"optimizer"`` (the tests check each against
``opt.update`` + ``apply_updates`` on both backends).
"""

from __future__ import annotations

from collections.abc import Callable

from duogard.grad import Forward, LeanStep
from duogard.grad._objective import MODEL_KEY, model_batch
from duogard.optim import PlainSGD, apply_updates
from duogard.tree import Rank1, tree_leaves, tree_map

__all__ = ["MODEL_KEY", "UPDATE_STRATEGIES", "choose_update", "make_step", "model_batch"]


#: The names of the update strategies, in the order :func:`choose_update` considers them.
UPDATE_STRATEGIES = ("sgd-lean", "sgd-factored", "sgd-in-place", "optimizer")


def choose_update(optimizer, estimator) -> str:
    """The update strategy for this optimizer and estimator (see the module docstring).

    Args:
        optimizer: a ``GradientTransformation``.
        estimator: a gradient estimator.

    Returns:
        One of :data:`UPDATE_STRATEGIES`.

    Raises:
        ValueError: ``estimator("forward", lean=True)`` with an optimizer that is not a
            momentum-free :func:`duogard.optim.sgd`.
    """
    plain = isinstance(optimizer, PlainSGD)
    if isinstance(estimator, Forward) and estimator.lean:
        if not plain:
            raise ValueError(
                "Trainer: estimator forward(lean=True) applies the SGD update itself, layer by layer; "
                "optimizer must be duogard.optim.sgd(learning_rate, weight_decay=...) without momentum, "
                f"got {optimizer!r:.120}"
            )
        return "sgd-lean"
    if plain:
        return (
            "sgd-factored" if isinstance(estimator, Forward) and estimator.factored_form else "sgd-in-place"
        )
    return "optimizer"


def make_step(
    strategy: str,
    be,
    estimator,
    optimizer,
    loss_fn,
    *,
    grad_norm: bool,
    compile=None,
    train_mode: bool = False,
) -> Callable:
    """The training step of ``strategy``: ``step(params, opt_state, x, y, key) -> (params, opt_state,
    loss, |g|²)``.

    A step whose loss or gradient is not finite returns the params and optimizer state it was
    given, unchanged, and its fourth result is NaN. Without ``grad_norm`` no norm is computed:
    the fourth result is then 0 for a finite step (NaN for a refused one; the lean step always
    returns |g|²). Every strategy but ``"optimizer"`` overwrites the params it is given (the
    caller owns them).

    Args:
        strategy: one of :data:`UPDATE_STRATEGIES` (from :func:`choose_update`).
        be: the backend.
        estimator: the gradient estimator.
        optimizer: the optimizer (a :class:`~duogard.optim.PlainSGD` for the SGD strategies).
        loss_fn: ``loss_fn(params, (x, y)) -> scalar``.
        grad_norm: return ``|g|²`` (one more pass over the gradient); without it the step still
            refuses a non-finite gradient with a finite loss (an elementwise finiteness check).
        compile: as ``be.jit``'s ``compile`` (None: the backend's default).
        train_mode: the model has a training mode (dropout, batch statistics): the loss sees
            :func:`model_batch`'s ``(x, y, model_key)`` (not with ``"sgd-lean"``).

    Returns:
        The step function (compiled on JAX; the lean step runs its own per-layer programs).
    """
    if strategy not in UPDATE_STRATEGIES:
        raise ValueError(f"make_step: strategy must be one of {UPDATE_STRATEGIES}, got {strategy!r}")
    jit_kw = {} if compile is None else {"compile": bool(compile)}
    if strategy == "sgd-lean":
        if train_mode:
            raise ValueError(
                "Trainer: estimator forward(lean=True) runs duogard's layer-by-layer rules, which "
                "have no training mode; the model has one (dropout or batch norm). Use lean=False"
            )
        lean = LeanStep(estimator, loss_fn, be, optimizer, compile=compile)
        return lambda params, opt_state, x, y, key: lean.step(params, opt_state, (x, y), key)
    xp = be.xp

    def step(params, opt_state, x, y, key):
        coef = None  # "sgd-factored": the estimate is coef * grads
        batch = model_batch(be, x, y, key, train_mode)
        if strategy == "sgd-factored":
            value, coef, grads = estimator.factored(loss_fn, params, batch, key)
        else:
            value, grads = estimator(loss_fn, params, batch, key)
        ok = xp.isfinite(value)
        if grad_norm:
            gsq = sum(_sq_norm(xp, g) for g in tree_leaves(grads))
            if coef is not None:
                gsq = gsq * coef * coef
            ok = xp.logical_and(ok, xp.isfinite(gsq))
        else:
            # no norm, but still no update from a NaN/inf gradient under a finite loss: the
            # factored estimate d v is finite where d is (v is drawn); else every element is read
            ok = xp.logical_and(ok, _all_finite(be, grads if coef is None else [coef]))
            gsq = xp.where(ok, xp.zeros_like(value), xp.full_like(value, float("nan")))
        if strategy == "optimizer":
            updates, new_state = optimizer.update(grads, opt_state, params)
            params = keep_if(be, ok, apply_updates(params, updates), params)
        else:
            lr, new_state = optimizer.advance(opt_state)
            params = tree_map(
                lambda p, g: optimizer.apply_(be, p, g, lr, scale=coef, where=ok), params, grads
            )
        return params, keep_if(be, ok, new_state, opt_state), value, gsq

    # params are donated: the SGD strategies update them in place under XLA too
    return be.jit(step, donate_argnums=(0,), **jit_kw)


def _all_finite(be, tree):
    """A 0-d bool array: every element of every leaf of ``tree`` is finite."""
    xp, ok = be.xp, None
    for leaf in tree_leaves(tree):
        for part in (leaf.u, leaf.w) if isinstance(leaf, Rank1) else (leaf,):
            # one pass: a NaN or inf makes the sum NaN or inf (a finite sum could overflow only
            # for gradients near the dtype's largest value)
            part_ok = xp.isfinite(xp.sum(part))
            ok = part_ok if ok is None else xp.logical_and(ok, part_ok)
    return ok if ok is not None else xp.asarray(True)


def keep_if(be, ok, new, old):
    """``new`` where the 0-d bool ``ok`` holds, else ``old`` (selected inside a compiled step)."""
    if be.is_tracing(ok):
        return tree_map(lambda a, b: be.xp.where(ok, a, b), new, old)
    return new if bool(ok) else old


def _sq_norm(xp, g):
    """``|g|²`` of a gradient leaf, or of a rank-1 tangent ``u wᵀ`` (K = 1) as ``|u|² |w|²``."""
    if isinstance(g, Rank1):
        return xp.sum(g.u * g.u) * xp.sum(g.w * g.w)
    return xp.linalg.vector_norm(g) ** 2
