"""Zeroth-order estimates: SPSA / MeZO two-point finite differences along random directions.

``g = (1/K) Σ_k d_k z_k`` with ``d_k = (f(θ + ε z_k) − f(θ − ε z_k)) / 2ε``: ``d_k`` plays the
role of the forward gradient's directional derivative ``∇f·z_k``, from two evaluations of the
loss instead of one JVP. The estimator is therefore a :class:`duogard.grad.Forward` with another
:meth:`~SPSA._directional`: the same tangents (``z_k``, drawn by
:meth:`~duogard.grad.Forward.tangent_tree`, the same numbers on every backend for the same key),
the same ``directional``/``combine`` split (a data-parallel step all-reduces the K + 1 numbers),
``factored`` form (K = 1) and ``sample``/``estimate`` (tangents shared by a parity run).

:class:`ZerothLeanStep` is the MeZO step (Malladi et al. 2023): the parameters are perturbed in
place, the loss evaluated, and each leaf updated from its regenerated perturbation, so the step
never holds a parameter-sized buffer beyond the parameters (its memory is that of inference).
"""

from __future__ import annotations

import math

import numpy as np

from duogard.backend import check_generator
from duogard.grad._base import check_bool, params_backend, register
from duogard.grad._forward import Forward, draw_leaf_tangent
from duogard.grad._objective import Batch
from duogard.tree import tree_flatten, tree_unflatten

__all__ = ["SPSA", "ZerothLeanStep", "two_point"]

_DISTRIBUTIONS = ("normal", "rademacher")


def two_point(be, f_plus, f_minus, eps: float):
    """``(loss, ds)`` from the K losses at ``θ + ε z_k`` and at ``θ − ε z_k`` (shape ``(K,)``).

    ``ds = (f₊ − f₋) / 2ε``; the loss is the mean of the 2K evaluations (see :class:`SPSA`).
    The one formula of both the estimator and the lean step.
    """
    xp = be.xp
    ds = (f_plus - f_minus) / (2.0 * eps)
    return xp.mean((f_plus + f_minus) * 0.5), ds


@register("spsa")
class SPSA(Forward):
    """SPSA / MeZO: the two-point zeroth-order estimate ``(1/K) Σ_k d_k z_k``,
    ``d_k = (f(θ + ε z_k) − f(θ − ε z_k)) / 2ε``, from 2K evaluations of the loss and no
    derivative of it (any loss that runs forward: no JVP or VJP rule is needed).

    What it estimates: for normal ``z`` the estimate is unbiased for the gradient of the
    Gaussian-smoothed loss ``f_ε(θ) = E_u f(θ + ε u)``, ``u ~ N(0, I)`` (for a quadratic loss,
    ``∇f_ε = ∇f``); as ε → 0, ``d_k → ∇f·z_k`` and the estimate tends to the forward gradient
    with the same tangents (:class:`duogard.grad.Forward`). The tests check both.

    Args:
        num_queries: K (default 1): the number of random directions, each costing two
            evaluations of the loss.
        eps: ε (default 1e-3, MeZO's): the perturbation scale. Smaller ε means less smoothing
            bias but more floating-point cancellation in ``f₊ − f₋`` (in float32 the losses
            carry about 7 digits, so ``d_k`` carries about ``7 + log10(2ε/|f|)`` of them).
        distribution: ``"normal"`` (default) or ``"rademacher"`` (random signs).
        generator: ``"portable"`` (default: the same perturbations on every backend for the
            same key) or ``"native"``.
        lean: used the ordinary way it changes nothing; in :class:`duogard.train.Trainer` /
            :func:`duogard.fit` with a momentum-free :func:`duogard.optim.sgd` it selects the
            update strategy ``"zo-lean"`` (:class:`ZerothLeanStep`, MeZO's step: perturb the
            parameters in place, evaluate, update each leaf from its regenerated perturbation;
            memory = inference). Any loss.

    The loss it reports is the mean of the 2K perturbed evaluations, ``(1/K) Σ_k (f₊ + f₋)/2``:
    free (no third evaluation), an unbiased estimate of ``f_ε(θ)`` (normal ``z``), and within
    ``O(ε²)`` of ``f(θ)`` (``(f₊ + f₋)/2 = f(θ) + ε²/2 zᵀ∇²f z + O(ε⁴)``).

    Perturbations: ``z_k`` is the k-th row of leaf i's ``(K, *shape)`` draw from
    ``fold_in(key, i)``, as :meth:`duogard.grad.Forward.tangent_tree` draws it (dense tangents).
    """

    #: the Forward options that SPSA does not have, fixed (class attributes: not in ``options()``)
    orthogonal = False
    projection = False
    tangents = "dense"
    jvp = "framework"

    def __init__(
        self,
        *,
        num_queries: int = 1,
        eps: float = 1e-3,
        distribution: str = "normal",
        generator: str = "portable",
        lean: bool = False,
    ):
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries <= 0:
            raise ValueError(f"spsa: num_queries must be a positive int, got {num_queries!r}")
        self.num_queries = num_queries
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
            raise ValueError(f"spsa: eps must be a positive finite number, got {eps!r}")
        self.eps = float(eps)
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"spsa: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        try:
            self.generator = check_generator(generator)
        except ValueError as exc:
            raise ValueError(f"spsa: {exc}") from None
        self.lean = check_bool("spsa", "lean", lean)

    @property
    def num_tangents(self) -> int:
        """K, the number of perturbations (the tangents of :class:`Forward`'s machinery)."""
        return self.num_queries

    def _directional(self, loss_fn, params, batch, vtree):
        """``(loss, ds)``: ``ds[k] = (f(θ + ε z_k) − f(θ − ε z_k)) / 2ε`` (shape ``(K,)``)."""
        be = params_backend(params)
        xp, eps = be.xp, self.eps
        leaves, treedef = tree_flatten(params)
        zs = tree_flatten(vtree)[0]
        f_plus, f_minus = [], []
        for k in range(self.num_queries):
            for sign, out in ((eps, f_plus), (-eps, f_minus)):
                moved = [p + sign * z[k] for p, z in zip(leaves, zs)]
                out.append(loss_fn(tree_unflatten(treedef, moved), batch))
        return two_point(be, xp.stack(f_plus), xp.stack(f_minus), eps)


class ZerothLeanStep:
    """``step(params, opt_state, batch, key)``: MeZO's SGD step, in place, for any loss.

    For each query k: every leaf ``p += ε z_k`` (in place), evaluate ``f₊``; ``p −= 2ε z_k``,
    evaluate ``f₋``; ``p += ε z_k`` (restore). Then each leaf is updated,
    ``p ← p (1 − lr wd) − lr g`` with ``g = (1/K) Σ_k d_k z_k``, by the one in-place SGD
    component (:meth:`duogard.optim.PlainSGD.apply_`). Every ``z`` is regenerated from the
    leaf's key ``fold_in(key, leaf index)`` where it is needed, one leaf at a time, so the
    step holds no parameter-sized buffer beyond the parameters: torch updates them in place; on
    JAX every perturbation and update is a per-leaf program with the leaf donated.

    Built by :class:`duogard.train.Trainer` (update strategy ``"zo-lean"``) for
    ``estimator("spsa", lean=True)`` with a momentum-free :func:`duogard.optim.sgd`.

    Restoring is not exact: ``((p + εz) − 2εz) + εz`` rounds differently from ``p``, by a few
    units in the last place of ``p`` (MeZO's restore drifts the same way). The step equals the
    non-lean one (``"sgd-factored"``/``"sgd-in-place"``, which never moves the params) to that
    rounding, not bitwise; the tests bound the drift. A refused step (non-finite loss) returns
    the restored params, equal to the given ones to that rounding. With K > 1 each pass draws a
    leaf's K rows and takes row k (the draws are those of :meth:`SPSA.tangent_tree`): K times
    the draws of K = 1, and a K-row temporary per leaf.
    """

    def __init__(self, estimator: SPSA, loss_fn, be, sgd, *, compile=None):
        self.be, self.sgd, self.loss_fn = be, sgd, loss_fn
        self.k, self.eps = estimator.num_queries, estimator.eps
        self._indices: dict = {}
        kind, generator, k = estimator.distribution, estimator.generator, self.k
        jit_kw = {} if compile is None else {"compile": bool(compile)}

        def draw(p, key, index):
            return draw_leaf_tangent(
                be,
                kind,
                be.fold_in(key, index),
                k,
                tuple(p.shape),
                dtype=p.dtype,
                device=be.device_of(p),
                generator=generator,
            )

        def perturb(p, key, index, row, scale):
            return be.add_scaled_(p, draw(p, key, index)[row], scale)

        def update(p, key, index, ds, lr):
            z = draw(p, key, index)
            xp = be.xp
            if k == 1:  # as "sgd-factored": p -= lr d z, the gradient d z never written
                return sgd.apply_(be, p, z[0], lr, scale=ds[0]), xp.linalg.vector_norm(z[0]) ** 2 * ds[0] ** 2
            g = estimator.combine(ds, z)  # as "sgd-in-place": the mean of d_k z_k
            return sgd.apply_(be, p, g, lr), xp.linalg.vector_norm(g) ** 2

        def head(f_plus, f_minus):
            value, ds = two_point(be, f_plus, f_minus, self.eps)
            xp = be.xp
            return value, ds, xp.logical_and(xp.isfinite(value), xp.all(xp.isfinite(ds)))

        self._perturb = be.jit(perturb, donate_argnums=(0,), **jit_kw)
        self._update = be.jit(update, donate_argnums=(0,), **jit_kw)
        # the batch's parts go in as arrays (a Batch is built inside: no tuple subclass crosses jit)
        self._loss = be.jit(lambda params, x, y, mkey: loss_fn(params, Batch(x, y, mkey)), **jit_kw)
        self._head = be.jit(head, **jit_kw)

    def _move(self, leaves, key, index, row, scale):
        return [self._perturb(p, key, i, row, scale) for p, i in zip(leaves, index)]

    def directional(self, params, batch, key):
        """``(params, loss, ds, finite)``: the K two-point differences over ``batch`` (a
        :class:`duogard.step.Batch`), with the params perturbed and restored in place (the
        returned params replace the given ones, equal to them to rounding); ``finite`` is a
        0-d bool.
        """
        be, eps = self.be, self.eps
        leaves, treedef = tree_flatten(params)
        index = self._index(len(leaves))
        parts = (batch.inputs, batch.targets, batch.model_key)
        f_plus, f_minus = [], []
        for row in range(self.k):
            leaves = self._move(leaves, key, index, row, eps)
            f_plus.append(self._loss(tree_unflatten(treedef, leaves), *parts))
            leaves = self._move(leaves, key, index, row, -2.0 * eps)
            f_minus.append(self._loss(tree_unflatten(treedef, leaves), *parts))
            leaves = self._move(leaves, key, index, row, eps)
        value, ds, finite = self._head(be.xp.stack(f_plus), be.xp.stack(f_minus))
        return tree_unflatten(treedef, leaves), value, ds, finite

    def step(self, params, opt_state, batch, key):
        """One SGD step: ``(params, opt_state, loss, |g|²)``. With a non-finite loss or
        difference nothing is updated (the params come back restored) and |g|² is NaN.
        """
        be = self.be
        params, value, ds, finite = self.directional(params, batch, key)
        if not bool(be.to_numpy(finite)):
            return params, opt_state, value, be.xp.full_like(value, float("nan"))
        lr, opt_state = self.sgd.advance(opt_state)
        lr = be.xp.astype(lr, ds.dtype)
        leaves, treedef = tree_flatten(params)
        new, total = [], 0.0
        for p, i in zip(leaves, self._index(len(leaves))):
            p, sq = self._update(p, key, i, ds, lr)
            new.append(p)
            total = total + sq
        return tree_unflatten(treedef, new), opt_state, value, total

    def _index(self, n: int) -> list:
        """The leaves' indices as 0-d uint32 arrays (one program for every leaf of a shape)."""
        if n not in self._indices:
            self._indices[n] = [self.be.asarray(np.asarray(i, dtype=np.uint32)) for i in range(n)]
        return self._indices[n]
