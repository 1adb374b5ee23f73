"""Diagnostics: how close an estimate is to the true (backprop) gradient."""

from __future__ import annotations

from duogard.grad._backprop import Backprop
from duogard.grad._base import Estimator, params_backend
from duogard.tree import tree_leaves

__all__ = ["gradient_agreement", "with_diagnostics"]


def gradient_agreement(estimate, reference) -> dict:
    """``{"cosine": cos(estimate, reference), "rel_norm": ‖estimate‖ / ‖reference‖}`` over whole pytrees.

    Returns backend scalars (jit-friendly); ``float()`` them to print.
    """
    be = params_backend(reference)
    xp = be.xp
    dot = sum(xp.sum(a * b) for a, b in zip(tree_leaves(estimate), tree_leaves(reference)))
    ne = xp.sqrt(sum(xp.sum(a * a) for a in tree_leaves(estimate)))
    nr = xp.sqrt(sum(xp.sum(b * b) for b in tree_leaves(reference)))
    tiny = 1e-30
    return {"cosine": dot / xp.maximum(ne * nr, tiny), "rel_norm": ne / xp.maximum(nr, tiny)}


def with_diagnostics(est: Estimator):
    """Wrap an estimator: ``(loss_fn, params, batch, key) -> (loss, grads, {"cosine", "rel_norm"})``.

    The true gradient is computed by backprop next to the estimate, so this costs an extra
    backward pass; the bare estimator (diagnostics off) pays nothing.
    """
    exact = Backprop()

    def run(loss_fn, params, batch, key=None):
        loss, grads = est(loss_fn, params, batch, key)
        _, true = exact(loss_fn, params, batch)
        return loss, grads, gradient_agreement(grads, true)

    return run
