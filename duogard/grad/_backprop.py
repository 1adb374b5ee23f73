"""Reverse mode: the ``backprop`` estimator, with optional activation checkpointing."""

from __future__ import annotations

from duogard.grad._base import Estimator, check_bool, params_backend, register
from duogard.grad._checkpoint import checkpointed_loss
from duogard.grad._forward import check_loss

__all__ = ["Backprop"]


@register("backprop")
class Backprop(Estimator):
    """Reverse mode: ``value_and_grad`` (``jax.value_and_grad``; ``torch.func.grad_and_value``).

    Args:
        checkpoint: activation checkpointing: the loss's Sequential runs as segments of
            ``checkpoint_every`` layers, each through ``be.checkpoint`` (``jax.checkpoint``;
            ``torch.utils.checkpoint``), so the backward pass stores only each segment's input
            and recomputes the activations inside it: one more forward pass for a step memory
            of about (layers / checkpoint_every) inputs plus one segment's activations. The same
            gradient (to rounding). For ``supervised(Sequential, loss)`` losses (what Trainer
            and fit build for a Sequential model); another loss is an error.
        checkpoint_every: layers per checkpointed segment; needs ``checkpoint=True``. Default
            (None, the recommended setting): ⌈√L⌉ for a Sequential of L layers, about √L
            segments of √L layers (Chen et al. 2016), which minimises that sum; an MLP of 8
            hidden layers (18 layers with its Flatten, ReLUs and head) runs segments of 5, 5, 5
            and 3 layers. A segment of one layer keeps that layer's input, which is what plain
            backprop keeps for a Linear or a ReLU: ``checkpoint_every=1`` saves nothing on an
            MLP and only adds the recomputation.
    """

    def __init__(self, *, checkpoint: bool = False, checkpoint_every: int | None = None):
        checkpoint = check_bool("backprop", "checkpoint", checkpoint)
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every < 1
        ):
            raise ValueError(f"backprop: checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if checkpoint_every is not None and not checkpoint:
            raise ValueError(
                f"backprop: checkpoint_every={checkpoint_every} needs checkpoint=True (got checkpoint=False)"
            )
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every

    def options(self) -> dict:
        # plain backprop keeps its plain name: estimator('backprop')
        return super().options() if self.checkpoint else {}

    def estimate(self, loss_fn, params, batch, tangents=None):
        be = params_backend(params)
        return be.value_and_grad(self._objective(be, loss_fn))(params, batch)

    @property
    def in_backward(self) -> bool:
        """Whether the estimate is the reverse pass's own gradient (a subclass with an
        :meth:`estimate` of its own says no), so that an SGD update may apply it leaf by leaf
        inside that pass: ``update="sgd-in-backward"`` (:mod:`duogard.step`).
        """
        return type(self).estimate is Backprop.estimate

    def grad_stream(self, loss_fn, params, batch):
        """:meth:`estimate`'s loss and gradient, the gradient handed over leaf by leaf:
        ``(loss, backward)`` from ``be.grad_stream`` (:meth:`duogard.backend.Backend.grad_stream`),
        checkpointed as :meth:`estimate` is.
        """
        be = params_backend(params)
        return be.grad_stream(self._objective(be, loss_fn), params, batch)

    def _objective(self, be, loss_fn):
        if self.checkpoint:
            loss_fn = checkpointed_loss(be, loss_fn, self.checkpoint_every)
        return lambda p, b: check_loss(be, loss_fn(p, b), "backprop")
