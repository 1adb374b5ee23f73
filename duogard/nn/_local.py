"""A block of layers with local heads: the unit of local-loss training."""

from __future__ import annotations

from duogard.nn._linear import _positive_int, uniform_init
from duogard.nn._module import Sequential

__all__ = ["Local"]


class Local(Sequential):
    """Layers applied in order, like :class:`Sequential`, with small linear heads on the output
    for a local loss.

    The block's output units (the last axis, ``D`` of them) are split into ``groups`` groups of
    ``D / groups`` consecutive units; group ``g`` has its own linear head, ``num_classes``
    outputs from its ``D / groups`` units. The heads are parameters like any other: the block's
    params are its layers' (keyed by position, as in :class:`Sequential`) and ``"head"``:
    ``{"weight": (groups, num_classes, D / groups), "bias": (groups, num_classes)}`` (torch's
    Linear init, fan-in ``D / groups``).

    :meth:`apply` runs the layers only: a model made of Local blocks computes what the same
    model without the heads computes, end-to-end estimators (``"backprop"``, ``"forward"`` ...)
    train it as usual (the heads get a zero gradient), and evaluation reads the model's final
    output. The local-loss estimators (``"local-backprop"``, ``"local-forward"``,
    ``"local-forward-activity"``; see :func:`duogard.grad.local_objective`) train each block on
    its heads' loss instead, with the gradient stopped at the block's input::

        model = nn.Sequential(
            nn.Flatten(),
            nn.Local(nn.LayerNorm(elementwise_affine=False), nn.Linear(256), nn.relu,
                     num_classes=10, groups=8),
            nn.Local(nn.LayerNorm(elementwise_affine=False), nn.Linear(256), nn.relu,
                     num_classes=10, groups=8),
            nn.LayerNorm(elementwise_affine=False), nn.Linear(10),
        )
        est = dg.estimator("local-forward-activity")

    Args:
        *layers: the block's layers (modules or callables, as for :class:`Sequential`).
        num_classes: outputs of each head (the task's classes, or the target's width).
        groups: how many groups (and heads) the output units are split into; it must divide
            the output width.
        head_norm: each head reads its group's units normalised (a layer norm without affine
            parameters over the group) instead of as they are.
    """

    def __init__(self, *layers, num_classes: int, groups: int = 1, head_norm: bool = False):
        super().__init__(*layers)
        self.num_classes = _positive_int("Local", "num_classes", num_classes)
        self.groups = _positive_int("Local", "groups", groups)
        self.head_norm = bool(head_norm)

    def init_params(self, rng, input_shape, dtype):
        params, shape = super().init_params(rng, input_shape, dtype)
        if len(shape) != 2 or shape[-1] % self.groups:
            raise ValueError(
                f"Local(groups={self.groups}): expected the block's output to be (batch, units) with "
                f"units divisible by groups, got shape {tuple(shape)}"
            )
        width = shape[-1] // self.groups
        params["head"] = {
            "weight": uniform_init(rng, (self.groups, self.num_classes, width), width, dtype),
            "bias": uniform_init(rng, (self.groups, self.num_classes), width, dtype),
        }
        return params, shape

    def heads(self, be, params, h):
        """The heads' logits ``(groups, batch, num_classes)`` from the block's output ``h``.

        Args:
            be: the backend that owns ``h``.
            params: the block's params (its ``"head"`` entry is read).
            h: the block's output ``(batch, units)``.
        """
        xp = be.xp
        head = params["head"]
        g = self.groups
        if h.ndim != 2 or h.shape[-1] != g * head["weight"].shape[-1]:
            raise ValueError(
                f"Local.heads: expected the block's output (batch, {g * head['weight'].shape[-1]}), "
                f"got {tuple(h.shape)}"
            )
        hg = xp.permute_dims(xp.reshape(h, (h.shape[0], g, -1)), (1, 0, 2))  # (G, B, D/G)
        if self.head_norm:
            hg = be.layer_norm(hg, None, None, normalized_ndim=1)
        return xp.matmul(hg, xp.matrix_transpose(head["weight"])) + head["bias"][:, None, :]

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(layer) for layer in self.layers)
        opts = f"num_classes={self.num_classes}, groups={self.groups}, head_norm={self.head_norm}"
        return f"Local(\n    {inner},\n    {opts}\n  )"
