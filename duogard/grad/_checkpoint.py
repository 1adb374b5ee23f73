"""Activation checkpointing for backprop: a Sequential's loss run as checkpointed segments."""

from __future__ import annotations

import math

from duogard.grad._objective import Supervised, _unpack
from duogard.nn import Sequential

__all__ = ["checkpointed_loss", "segment_length"]


def segment_length(layers: int) -> int:
    """⌈√L⌉: the layers per segment of the default checkpointing of L layers.

    Checkpointing keeps each segment's input through the backward pass and one segment's
    activations at a time while it is recomputed: for L layers in segments of k, about L/k + k
    layers' worth, least near k = √L (Chen, Xu, Zhang and Guestrin 2016, "Training deep nets
    with sublinear memory cost"). Rounded up: fewer, longer segments when L is not a square.
    """
    return math.isqrt(layers - 1) + 1 if layers > 1 else 1


def checkpointed_loss(be, loss_fn, every: int | None = None):
    """``loss_fn`` with each segment of ``every`` consecutive layers of its model checkpointed.

    The loss must be ``supervised(Sequential, loss)`` (:func:`duogard.grad.supervised` of a
    :class:`duogard.nn.Sequential` that keeps Sequential's own ``forward``): the layers are
    run in order, as ``Sequential.forward`` runs them (layer i's params and key ``fold_in(key,
    i)``), each segment through ``be.checkpoint``, so the backward pass keeps only the
    segments' inputs and recomputes what lies inside them. Same values and gradients as
    ``loss_fn``.

    Args:
        be: the backend of the params.
        loss_fn: the loss to segment.
        every: layers per segment (1: every layer on its own); None: ⌈√L⌉ for the model's L
            layers (:func:`segment_length`).

    Returns:
        ``loss(params, batch)``, the checkpointed loss.

    Raises:
        ValueError: a loss that is not ``supervised(Sequential, ...)``.
    """
    model = getattr(loss_fn, "model", None)
    if (
        not isinstance(loss_fn, Supervised)
        or not isinstance(model, Sequential)
        or type(model).forward is not Sequential.forward
    ):
        raise ValueError(
            "backprop: checkpoint=True segments the loss layer by layer, so the loss must be "
            "duogard.grad.supervised(nn.Sequential(...), loss) (what Trainer and fit build for a "
            f"Sequential model); got {loss_fn!r:.120}. Use checkpoint=False, or wrap the "
            "expensive part of your own loss in be.checkpoint(fn)"
        )
    layers = model.layers
    every = segment_length(len(layers)) if every is None else every
    segments = [range(i, min(i + every, len(layers))) for i in range(0, len(layers), every)]

    def segment(indices):
        def run(params, x, key):
            for i in indices:
                layer_key = Sequential.layer_key(be, key, i)
                x = layers[i].forward(be, params.get(str(i), {}), x, key=layer_key, train=key is not None)
            return x

        return be.checkpoint(run)

    runs = [(segment(indices), indices) for indices in segments]

    def loss(params, batch):
        x, y, key = _unpack(batch)
        for run, indices in runs:
            x = run({str(i): params[str(i)] for i in indices if str(i) in params}, x, key)
        return loss_fn.loss(x, y)

    return loss
