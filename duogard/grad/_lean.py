"""A forward-gradient SGD step whose memory does not grow with depth.

Forward mode keeps no activations, but the usual step still holds parameter-sized buffers:
the whole tangent, the estimate ``d·v``, the update and the new parameters. Here every leaf's
tangent is drawn from its own key (``fold_in(key, leaf index)``) when the forward pass reaches
its layer, used, and dropped; once the directional derivatives are known, each leaf's tangent
is drawn again from the same key and the SGD update is applied to that leaf alone, in place
(torch) or into the donated buffer (JAX). No buffer the size of the whole model is ever made,
so the peak beyond the parameters is one layer's worth (``duogard bench`` measures it).

The price is a second draw of every tangent. The numbers are those of
``estimator("forward", lean=True)`` used the ordinary way (its :meth:`sample` draws the same
per-leaf tangents): the tests check the fused update against ``params - lr * estimate``.

On JAX each layer is its own jitted program: in one whole-step program XLA schedules every
draw up front and keeps all tangents alive at once (``compiled.memory_analysis()``).
"""

from __future__ import annotations

import numpy as np

from duogard.grad._forward import draw_leaf_tangent
from duogard.grad._rules import _layer, _loss_jvp
from duogard.grad._rules import plan as _rules_plan
from duogard.tree import Rank1, tree_leaves, tree_structure

__all__ = ["LeanStep", "leaf_keys_order"]


def leaf_keys_order(params) -> dict:
    """``{(layer name, leaf name): index in tree_leaves(params)}`` for a Sequential's params."""
    names = {ln: {n: f"{ln}\0{n}" for n in layer} for ln, layer in params.items()}
    return {tuple(path.split("\0")): i for i, path in enumerate(tree_leaves(names))}


class LeanStep:
    """``step(params, opt_state, batch, key)``: the forward-gradient SGD step without whole-model buffers.

    Built by :class:`duogard.train.Trainer` (update strategy ``"sgd-lean"``) for
    ``estimator("forward", lean=True)`` with a momentum-free :func:`duogard.optim.sgd` (a
    :class:`duogard.optim.PlainSGD`, whose :meth:`~duogard.optim.PlainSGD.apply_` writes each
    leaf). The loss must be covered by duogard's forward rules (a :class:`duogard.nn.Sequential`
    of duogard layers with ``cross_entropy`` or ``mse``).
    """

    def __init__(self, estimator, loss_fn, be, sgd, *, compile=None):
        plan = _rules_plan(loss_fn, (None, None))
        if plan is None:
            raise ValueError(
                "forward(lean=True) runs the model layer by layer with duogard's forward rules: the "
                "loss must be supervised(Sequential of duogard layers, cross_entropy or mse) with "
                "Linear/Conv2d as the only layers holding params; use lean=False for this model"
            )
        self.model, self.loss = plan
        self._indices = {}
        self.be, self.sgd, self.k = be, sgd, estimator.num_tangents
        kind = estimator.distribution
        draw_kw = {"rank1": estimator.tangents == "rank1", "generator": estimator.generator}

        jit_kw = {} if compile is None else {"compile": bool(compile)}
        k = self.k

        def tangents(p, key, index):
            # fold_in inside the program: eager key arithmetic costs more than the draw on JAX
            return {
                n: draw_leaf_tangent(
                    be,
                    kind,
                    be.fold_in(key, index[n]),
                    k,
                    tuple(p[n].shape),
                    dtype=p[n].dtype,
                    device=be.device_of(p[n]),
                    **draw_kw,
                )
                for n in p
            }

        # one program per distinct layer (by its repr: the same config and shapes compile once)
        programs = {}
        self._forward = []
        for layer in self.model.layers:
            ident = (type(layer), repr(layer), layer.has_params)
            if ident not in programs:
                if layer.has_params:

                    def fwd(p, key, index, x, tx, layer=layer):
                        return _layer(be, layer, p, tangents(p, key, index), x, tx, k)
                else:

                    def fwd(p, key, index, x, tx, layer=layer):
                        return _layer(be, layer, {}, {}, x, tx, k)

                programs[ident] = be.jit(fwd, **jit_kw)
            self._forward.append(programs[ident])

        def head(z, tz, y):
            value, ds = _loss_jvp(be, self.loss, z, tz, y)
            xp = be.xp
            return value, ds, xp.logical_and(xp.isfinite(value), xp.all(xp.isfinite(ds)))

        self._head = be.jit(head, **jit_kw)

        def update(p, key, index, coef, lr):
            # p <- p (1 - lr wd) - lr g, g = sum_k coef_k v_k (coef = d / K), written by the one
            # in-place SGD component; returns |g|^2 too
            v = draw_leaf_tangent(
                be,
                kind,
                be.fold_in(key, index),
                k,
                tuple(p.shape),
                dtype=p.dtype,
                device=be.device_of(p),
                **draw_kw,
            )
            xp = be.xp
            if isinstance(v, Rank1):
                if k == 1:  # a rank-1 update, and |d u wᵀ|² = d² |u|² |w|²
                    sq = xp.sum(v.u * v.u) * xp.sum(v.w * v.w) * coef[0] * coef[0]
                    return sgd.apply_(be, p, v, lr, scale=coef[0]), sq
                g = v.combine(xp, coef)
            elif k == 1:
                return sgd.apply_(be, p, v[0], lr, scale=coef[0]), xp.sum(v * v) * coef[0] * coef[0]
            else:
                g = xp.tensordot(coef, v, axes=1)
            return sgd.apply_(be, p, g, lr), xp.sum(g * g)

        self._update = be.jit(update, donate_argnums=(0,), **jit_kw)

    def directional(self, params, batch, key):
        """``(loss, d, finite)``: the loss, its K directional derivatives along the per-leaf
        tangents, and whether both are finite (0-d bool array).
        """
        x, y = batch[0], batch[1]
        index = self._index(params)
        tx = None
        for i, fwd in enumerate(self._forward):
            name = str(i)
            x, tx = fwd(params.get(name, {}), key, index.get(name, {}), x, tx)
        return self._head(x, tx, y)

    def update(self, params, key, ds, lr):
        """New params (the old buffers are reused: do not use ``params`` afterwards) and |g|²."""
        index = self._index(params)
        coef = ds / self.k
        new, total = {}, 0.0
        for name, layer in params.items():
            new[name] = {}
            for leaf, p in layer.items():
                new[name][leaf], sq = self._update(p, key, index[name][leaf], coef, lr)
                total = total + sq
        return new, total

    def step(self, params, opt_state, batch, key):
        """One SGD step: ``(params, opt_state, loss, |g|²)``. With a non-finite loss or derivative
        nothing is updated (the inputs come back unchanged) and |g|² is NaN.
        """
        be = self.be
        value, ds, finite = self.directional(params, batch, key)
        if not bool(be.to_numpy(finite)):
            return params, opt_state, value, float("nan")
        lr, opt_state = self.sgd.advance(opt_state)
        params, gsq = self.update(params, key, ds, be.xp.astype(lr, ds.dtype))
        return params, opt_state, value, gsq

    def _index(self, params):
        """Each leaf's index in ``tree_leaves(params)`` as a 0-d array (one program for every
        layer), computed once per params structure.
        """
        structure = tree_structure(params)
        cached = self._indices.get(structure)
        if cached is None:
            be, order = self.be, leaf_keys_order(params)
            cached = {
                ln: {n: be.asarray(np.asarray(order[(ln, n)], dtype=np.uint32)) for n in layer}
                for ln, layer in params.items()
            }
            self._indices[structure] = cached
        return cached
