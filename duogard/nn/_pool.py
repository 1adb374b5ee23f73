"""Pooling and reshaping layers."""

from __future__ import annotations

from duogard.nn._conv import output_hw, pair
from duogard.nn._module import Module

__all__ = ["MaxPool2d", "AvgPool2d", "Flatten"]


class _Pool2d(Module):
    has_params = False

    def __init__(self, kernel_size, stride=None, padding=0):
        name = type(self).__name__
        self.kernel_size = pair(name, "kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else pair(name, "stride", stride)
        self.padding = pair(name, "padding", padding, minimum=0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"{name}: padding {self.padding} must be at most half the kernel size {self.kernel_size}"
            )

    def _check(self, shape) -> tuple[int, int]:
        """The output's (H, W); ValueError for a rank other than 4 or an input smaller than the window."""
        name = type(self).__name__
        if len(shape) != 4:
            raise ValueError(f"{name}: expected a rank-4 NCHW input, got shape {tuple(shape)}")
        pads = tuple((p, p) for p in self.padding)
        return output_hw(f"{name}({self.kernel_size})", shape, self.kernel_size, self.stride, (1, 1), pads)

    def init_params(self, rng, input_shape, dtype):
        out = self._check(input_shape)
        return {}, (*input_shape[:2], *out)


class MaxPool2d(_Pool2d):
    """Max pooling over NCHW inputs (padding counts as -inf), like ``torch.nn.MaxPool2d``."""

    def forward(self, be, params, x, *, key=None, train=False):
        self._check(tuple(x.shape))
        return be.max_pool2d(x, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)


class AvgPool2d(_Pool2d):
    """Average pooling over NCHW inputs, like ``torch.nn.AvgPool2d``."""

    def __init__(self, kernel_size, stride=None, padding=0, *, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, be, params, x, *, key=None, train=False):
        self._check(tuple(x.shape))
        return be.avg_pool2d(
            x,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            count_include_pad=self.count_include_pad,
        )


class Flatten(Module):
    """Flatten dims ``start_dim`` .. end into one, like ``torch.nn.Flatten`` (default keeps the batch)."""

    has_params = False

    def __init__(self, start_dim: int = 1):
        self.start_dim = int(start_dim)

    def init_params(self, rng, input_shape, dtype):
        s = self.start_dim
        if not 0 <= s < max(len(input_shape), 1):
            raise ValueError(f"Flatten: start_dim {s} out of range for input shape {tuple(input_shape)}")
        size = 1
        for d in input_shape[s:]:
            size *= d
        return {}, (*input_shape[:s], size)

    def forward(self, be, params, x, *, key=None, train=False):
        return be.xp.reshape(x, (*x.shape[: self.start_dim], -1))
