"""Guessed tangents (Fournier et al., ICML 2023): the ``forward-guess`` estimator."""

from __future__ import annotations

from duogard.grad._base import Estimator, params_backend, register
from duogard.grad._forward import forward_mode_errors
from duogard.grad._local import LocalBackprop, leaves_no_head, local_model_of, map_heads

__all__ = ["ForwardGuess"]


@register("forward-guess")
class ForwardGuess(Estimator):
    """Forward gradients along guessed tangents (Fournier, Rivaud, Belilovsky, Eickenberg,
    Oyallon; ICML 2023): the tangent of each block is the gradient of its local loss.

    For a model of :class:`duogard.nn.Local` blocks: the guess ``v`` is the exact gradient of
    the local objective (``"local-backprop"``). For each block i (its layers, not its heads)
    and for the output part, one JVP of the **end-to-end** loss along ``v_i`` (``v`` restricted
    to that part) gives ``d_i = ∇_i f · v_i``, and the estimate of that part's gradient is the
    projection of the true gradient onto the guess, ``d_i v_i / ‖v_i‖²`` (zero where
    ``v_i = 0``). The heads get their exact local gradient, so the guesses keep improving. Biased
    (a projection onto a direction that depends on the batch, not a random one), but with the
    variance of one local gradient, not of a random direction in parameter space. The output
    part's guess is its own gradient, so its estimate is exact.

    The JVPs of the parts are batched (``vmap``); the loss returned is the end-to-end loss.
    """

    def estimate(self, loss_fn, params, batch, tangents=None):
        model, _, blocks, top = local_model_of(loss_fn, "forward-guess")
        be = params_backend(params)
        xp = be.xp
        guess = LocalBackprop().estimate(loss_fn, params, batch)[1]
        parts = [str(i) for i in blocks] + [
            str(i) for i in range(top, len(model.layers)) if params.get(str(i))
        ]
        count = len(parts)

        def stacked(name, leaf, path_head):
            # part j's tangent in slot j; the heads get none (the end-to-end loss ignores them)
            if path_head or name not in parts:
                return xp.zeros((count, *leaf.shape), dtype=leaf.dtype, device=be.device_of(leaf))
            onehot = xp.astype(xp.arange(count) == parts.index(name), leaf.dtype)
            return xp.reshape(onehot, (count,) + (1,) * leaf.ndim) * leaf[None]

        vtree = {
            name: map_heads(g, lambda leaf, head, name=name: stacked(name, leaf, head))
            for name, g in guess.items()
        }
        with forward_mode_errors("forward-guess"):
            values, ds = be.vmap(lambda t: be.jvp(lambda p: loss_fn(p, batch), (params,), (t,)))(vtree)
        grads = {}
        for name, g in guess.items():
            if name not in parts:
                grads[name] = g
                continue
            j = parts.index(name)
            sq = sum(xp.sum(leaf * leaf) for leaf in leaves_no_head(g))
            scale = xp.where(sq > 0, ds[j] / xp.where(sq > 0, sq, xp.ones_like(sq)), xp.zeros_like(sq))
            grads[name] = map_heads(g, lambda leaf, head, s=scale: leaf if head else s * leaf)
        return values[0], grads
