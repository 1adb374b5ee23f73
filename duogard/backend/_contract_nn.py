"""The backend contract's nn ops (a part of :class:`Backend`): what layers and losses need that the
array API standard lacks (convolution, pooling, activations, softmax, layer norm ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["NNOps"]


class NNOps(Protocol):
    """The nn ops every backend implements (one docstring each; the backends' functions stay short)."""

    def linear(self, x: Any, w: Any, b: Any = None) -> Any:
        """``x @ w.T + b``, with ``w`` of shape ``(out, in)`` and ``b`` of shape ``(out,)`` or None.

        Mixed dtypes promote as matmul does: float32 data with float64 parameters computes in
        float64.
        """

    def conv2d(
        self,
        x: Any,
        w: Any,
        b: Any = None,
        *,
        stride: Sequence[int] = (1, 1),
        padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
        dilation: Sequence[int] = (1, 1),
        groups: int = 1,
    ) -> Any:
        """2-D cross-correlation of ``x`` (NCHW) with ``w`` (OIHW), plus ``b`` per output channel.

        Args:
            x: the input, ``(N, C, H, W)``.
            w: the kernel, ``(O, C // groups, KH, KW)``.
            b: the bias, ``(O,)``, or None; a bias of another dtype promotes the result.
            stride: ``(sh, sw)``.
            padding: ``((top, bottom), (left, right))`` zeros; asymmetric padding is allowed.
            dilation: ``(dh, dw)``.
            groups: the number of channel groups.

        Returns:
            The output, ``(N, O, H', W')``.
        """

    def conv2d_weight_grad(
        self,
        x: Any,
        gz: Any,
        w_shape: Sequence[int],
        *,
        stride: Sequence[int] = (1, 1),
        padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
        dilation: Sequence[int] = (1, 1),
        groups: int = 1,
    ) -> Any:
        """The gradient of ``sum(gz * conv2d(x, w))`` in ``w``: the transpose of the convolution in
        ``w``, without computing the forward convolution.

        Args:
            x: the convolution's input.
            gz: the cotangent of its output.
            w_shape: the kernel's shape.
            stride: as for :meth:`conv2d`.
            padding: as for :meth:`conv2d`.
            dilation: as for :meth:`conv2d`.
            groups: as for :meth:`conv2d`.

        Returns:
            An array of shape ``w_shape``.
        """

    def max_pool2d(
        self, x: Any, *, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int] = (0, 0)
    ) -> Any:
        """Max pooling over the last two axes of ``x`` (NCHW); ``padding`` ``(ph, pw)`` on each side
        never wins.
        """

    def avg_pool2d(
        self,
        x: Any,
        *,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int] = (0, 0),
        count_include_pad: bool = True,
    ) -> Any:
        """Average pooling over the last two axes of ``x`` (NCHW), zero ``padding`` ``(ph, pw)`` on
        each side, counted in the divisor when ``count_include_pad``.
        """

    def relu(self, x: Any) -> Any:
        """``max(x, 0)``."""

    def leaky_relu(self, x: Any, negative_slope: float = 0.01) -> Any:
        """``x`` where ``x > 0``, else ``negative_slope * x`` (at ``x = 0`` the slope is
        ``negative_slope``, as in PyTorch).
        """

    def gelu(self, x: Any, approximate: bool = False) -> Any:
        """GELU: the exact erf form, or the tanh approximation when ``approximate``."""

    def sigmoid(self, x: Any) -> Any:
        """``1 / (1 + exp(-x))``."""

    def softplus(self, x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
        """``log(1 + exp(beta * x)) / beta``, and ``x`` itself where ``beta * x > threshold``
        (PyTorch's rule).
        """

    def elu(self, x: Any, alpha: float = 1.0) -> Any:
        """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``."""

    def silu(self, x: Any) -> Any:
        """``x * sigmoid(x)``."""

    def tanh(self, x: Any) -> Any:
        """The hyperbolic tangent."""

    def softmax(self, x: Any, axis: int = -1) -> Any:
        """Softmax along ``axis``."""

    def log_softmax(self, x: Any, axis: int = -1) -> Any:
        """Log-softmax along ``axis``."""

    def nll_values(self, log_probs: Any, labels: Any) -> Any:
        """``-log_probs[..., label]`` for each row (integer ``labels`` of shape
        ``log_probs.shape[:-1]``): the per-example negative log-likelihood. A label outside
        ``[0, C)`` raises ``IndexError``, or, inside a compiled program (where nothing can be
        raised), makes that row NaN.
        """

    def logsumexp(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        """``log(sum(exp(x)))`` along ``axis`` (over every element when None)."""

    def attention(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        mask: Any = None,
        causal: bool = False,
        scale: float | None = None,
        block: int = 512,
    ) -> Any:
        """Scaled dot-product attention, ``softmax(q kᵀ · scale + mask) v``, one block of keys at a
        time, with a forward-mode rule that never holds the ``(Lq, Lk)`` matrix of scores.

        The keys are taken ``block`` at a time (the last block may be shorter) with the online
        softmax: a running row maximum ``m``, normaliser ``l = Σ p`` and output ``o = Σ p v``
        with ``p = exp(s - m)``, rescaled when ``m`` grows. Forward mode carries the tangents
        through the same pass: per block ``ds = (dq kᵀ + q dkᵀ) · scale + dmask``, and
        ``d out = (Σ p dv + Σ p·ds v) / l - out · (Σ p·ds) / l``. Memory is one block of
        scores, ``(..., Lq, block)``, for the value and for the JVP: linear in the sequence
        length where the math form is quadratic. Reverse mode goes through the same blocks
        and keeps every block's weights for the backward pass, as the math form keeps its
        matrix. The same numbers as the math form up to rounding (about 1e-15 relative in
        float64).

        JAX: a ``jax.custom_jvp`` over a ``lax.scan`` of blocks (jit, vmap and grad pass it;
        grad transposes the rule). torch: a loop over blocks, each a ``torch.autograd.Function``
        with ``jvp`` and ``backward`` rules (``torch.func.jvp``, ``vmap`` and ``grad`` pass it;
        torch's fused attention kernels have no forward-mode rule).

        Args:
            q: the queries, ``(..., Lq, D)``.
            k: the keys, ``(..., Lk, D)``.
            v: the values, ``(..., Lk, Dv)``; the leading axes of q, k, v and mask broadcast.
            mask: None; a boolean array broadcastable to ``(..., Lq, Lk)``, true where a query
                may attend to a key; or a float array added to the scores (differentiable:
                its tangent enters ``ds``).
            causal: also mask every key after its query (key ``j`` attends to query ``i`` only
                where ``j <= i``: PyTorch's ``is_causal``). A row with no key left gives 0.
            scale: multiplies ``q kᵀ``; None is ``1 / sqrt(D)``.
            block: keys per block.

        Returns:
            The output, ``(..., Lq, Dv)``, in the promoted dtype of q, k and v.
        """

    def layer_norm(self, x: Any, weight: Any, bias: Any, *, normalized_ndim: int, eps: float = 1e-5) -> Any:
        """Layer normalisation over the last ``normalized_ndim`` axes of ``x``.

        ``(x - mean) / sqrt(var + eps)`` with the biased variance, times ``weight``, plus
        ``bias`` (either may be None).
        """
