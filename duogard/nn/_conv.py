"""2-D convolution (NCHW images, OIHW weights, as in torch)."""

from __future__ import annotations

import numpy as np

from duogard.nn._linear import _positive_int, uniform_init
from duogard.nn._module import Module

__all__ = ["Conv2d", "pair", "output_hw"]


def pair(layer: str, arg: str, value, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints -> a pair, each >= minimum."""
    vals = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(vals) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in vals
    ):
        raise ValueError(f"{layer}: {arg} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return int(vals[0]), int(vals[1])


def output_hw(layer: str, input_shape, kernel, stride, dilation, pads) -> tuple[int, int]:
    """The output's (H, W) for an NCHW ``input_shape``; ValueError naming ``layer``, the input's
    spatial size, the kernel, padding and dilation when the input is smaller than the (dilated)
    kernel. JAX would return an empty output (a NaN loss downstream), torch a raw RuntimeError.
    """
    hw = tuple(int(v) for v in input_shape[2:])
    out = tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, k, s, d, (lo, hi) in zip(hw, kernel, stride, dilation, pads)
    )
    if min(out) <= 0:
        raise ValueError(
            f"{layer}: input spatial size {hw} (input shape {tuple(input_shape)}) is too small for "
            f"kernel_size {tuple(kernel)} with padding {tuple(pads)} and dilation {tuple(dilation)}: "
            f"the output would be {out}"
        )
    return out


class Conv2d(Module):
    """2-D convolution over NCHW inputs, like ``torch.nn.Conv2d``.

    ``padding`` is an int, a pair, ``"valid"`` (no padding) or ``"same"`` (stride 1 only;
    odd total padding puts the extra row/column at the bottom/right, as torch does).
    The number of input channels is inferred from the example input at :meth:`init`.
    """

    def __init__(
        self,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
    ):
        self.out_channels = _positive_int("Conv2d", "out_channels", out_channels)
        self.kernel_size = pair("Conv2d", "kernel_size", kernel_size)
        self.stride = pair("Conv2d", "stride", stride)
        self.dilation = pair("Conv2d", "dilation", dilation)
        self.groups = _positive_int("Conv2d", "groups", groups)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"Conv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"Conv2d: padding='same' needs stride 1, got stride {self.stride}")
            self.padding = padding
        else:
            self.padding = pair("Conv2d", "padding", padding, minimum=0)
        if self.out_channels % self.groups:
            raise ValueError(
                f"Conv2d: out_channels ({self.out_channels}) must be divisible by groups ({self.groups})"
            )
        self.bias = bool(bias)

    def _pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple((p, p) for p in self.padding)

    def _check_input(self, shape) -> None:
        if len(shape) != 4:
            raise ValueError(
                f"Conv2d({self.out_channels}, {self.kernel_size}): expected a rank-4 NCHW input, "
                f"got shape {tuple(shape)}"
            )
        if shape[1] % self.groups:
            raise ValueError(
                f"Conv2d({self.out_channels}, {self.kernel_size}): input channels ({shape[1]}) must "
                f"be divisible by groups ({self.groups}); got input shape {tuple(shape)}"
            )

    def init_params(self, rng, input_shape, dtype):
        self._check_input(input_shape)
        n, c, h, w = input_shape
        kh, kw = self.kernel_size
        fan_in = c // self.groups * kh * kw
        params = {"weight": uniform_init(rng, (self.out_channels, c // self.groups, kh, kw), fan_in, dtype)}
        if self.bias:
            params["bias"] = uniform_init(rng, (self.out_channels,), fan_in, dtype)
        out_hw = self._output_hw(input_shape)
        return params, (n, self.out_channels, *out_hw)

    def _output_hw(self, shape) -> tuple[int, int]:
        layer = f"Conv2d({self.out_channels}, {self.kernel_size})"
        return output_hw(layer, shape, self.kernel_size, self.stride, self.dilation, self._pads())

    def forward(self, be, params, x, *, key=None, train=False):
        self._check_input(tuple(x.shape))
        w = params["weight"]
        if x.shape[1] != w.shape[1] * self.groups:
            raise ValueError(
                f"Conv2d({self.out_channels}, {self.kernel_size}): expected {w.shape[1] * self.groups} "
                f"input channels (NCHW), got input shape {tuple(x.shape)}"
            )
        self._output_hw(tuple(x.shape))
        return be.conv2d(
            x,
            w,
            params["bias"] if self.bias else None,
            stride=self.stride,
            padding=self._pads(),
            dilation=self.dilation,
            groups=self.groups,
        )
