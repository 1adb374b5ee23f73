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
        residual: the block's output is its input plus what its layers compute (MLP-Mixer's
            ``x + f(x)``; the shapes must agree). The input is constant for the block's local
            loss (the gradient is stopped there), so the sum changes no local derivative.

    **Tokens.** The output may also be ``(batch, tokens, units)`` (a mixer's patches, see
    :class:`duogard.nn.Patches`): the units of every token are split into the same groups, and
    head g reads the token-mean of group g's units. The local estimators then use one loss
    per group *and token* (Ren et al.'s patch-wise losses): token t's loss is head g's loss on
    the token-mean in which every other token is held constant, so its value is the group's
    loss and its derivative reaches token t only; the sum over tokens has the derivative of
    the group's loss (:meth:`token_logits`).
    """

    def __init__(
        self,
        *layers,
        num_classes: int,
        groups: int = 1,
        head_norm: bool = False,
        residual: bool = False,
    ):
        super().__init__(*layers)
        self.num_classes = _positive_int("Local", "num_classes", num_classes)
        self.groups = _positive_int("Local", "groups", groups)
        self.head_norm = bool(head_norm)
        self.residual = bool(residual)

    def init_params(self, rng, input_shape, dtype):
        params, shape = super().init_params(rng, input_shape, dtype)
        if len(shape) not in (2, 3) or shape[-1] % self.groups:
            raise ValueError(
                f"Local(groups={self.groups}): expected the block's output to be (batch, units) or "
                f"(batch, tokens, units) with units divisible by groups, got shape {tuple(shape)}"
            )
        if self.residual and tuple(shape) != tuple(input_shape):
            raise ValueError(
                f"Local(residual=True): the block's output shape {tuple(shape)} must be its input's "
                f"{tuple(input_shape)}"
            )
        width = shape[-1] // self.groups
        params["head"] = {
            "weight": uniform_init(rng, (self.groups, self.num_classes, width), width, dtype),
            "bias": uniform_init(rng, (self.groups, self.num_classes), width, dtype),
        }
        return params, shape

    def forward(self, be, params, x, *, key=None, train=False):
        h = super().forward(be, params, x, key=key, train=train)
        return h + x if self.residual else h

    def heads(self, be, params, h):
        """The heads' logits ``(groups, batch, num_classes)`` from the block's output ``h``.

        Args:
            be: the backend that owns ``h``.
            params: the block's params (its ``"head"`` entry is read).
            h: the block's output ``(batch, units)``, or ``(batch, tokens, units)`` (then the
                heads read the mean over the tokens).
        """
        self._check_output(h, "heads")
        if h.ndim == 3:
            h = be.xp.mean(h, axis=1)
        return self._logits(be, params, h[:, None, :])[:, :, 0, :]

    def token_logits(self, be, params, h):
        """The logits of the patch-wise losses, ``(groups, batch, tokens, num_classes)``.

        Token t's logits are the heads' on the token-mean of ``h`` with every token but t held
        constant (``stop_gradient``): the value of :meth:`heads` for every t, a derivative that
        reaches token t alone. For a ``(batch, units)`` output: :meth:`heads` with one token.
        """
        self._check_output(h, "token_logits")
        if h.ndim == 2:
            return self._logits(be, params, h[:, None, :])
        held = be.stop_gradient(h)
        mean = be.xp.mean(held, axis=1, keepdims=True)
        return self._logits(be, params, mean + (h - held) / h.shape[1])

    def _check_output(self, h, what: str) -> None:
        g = self.groups
        if h.ndim not in (2, 3) or h.shape[-1] % g:
            raise ValueError(
                f"Local.{what}: expected the block's output (batch, units) or (batch, tokens, units) "
                f"with units divisible by {g}, got {tuple(h.shape)}"
            )

    def _logits(self, be, params, h):
        """``(G, B, T, C)`` logits of ``h`` ``(B, T, D)``: head g on group g's units of each token."""
        xp = be.xp
        head = params["head"]
        g = self.groups
        b, t, d = h.shape
        if d != g * head["weight"].shape[-1]:
            raise ValueError(
                f"Local.heads: expected the block's output with {g * head['weight'].shape[-1]} units, "
                f"got {tuple(h.shape)}"
            )
        hg = xp.permute_dims(xp.reshape(h, (b * t, g, d // g)), (1, 0, 2))  # (G, B*T, D/G)
        if self.head_norm:
            hg = be.layer_norm(hg, None, None, normalized_ndim=1)
        logits = xp.matmul(hg, xp.matrix_transpose(head["weight"])) + head["bias"][:, None, :]
        return xp.reshape(logits, (g, b, t, -1))

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(layer) for layer in self.layers)
        opts = f"num_classes={self.num_classes}, groups={self.groups}, head_norm={self.head_norm}"
        if self.residual:
            opts += ", residual=True"
        return f"Local(\n    {inner},\n    {opts}\n  )"
