"""Helpers shared by the ``torch.fx`` rules (:mod:`.rules`, :mod:`.fx_modules`): argument checks and
the small computations several rules make. Imports no rule module.
"""

from __future__ import annotations

import math

from .helpers import Unsupported, channel_view, pair, static

__all__ = [
    "conv_padding",
    "axis_index",
    "flatten",
    "shape_args",
    "batch_norm",
    "dropout",
    "no_dtype",
    "pool_checks",
    "max_pool",
    "avg_pool",
    "gelu",
    "gelu_check",
    "softmax_dim",
]


def conv_padding(padding, kernel, dilation, stride):
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if pair(stride) != (1, 1):
                raise Unsupported("padding='same' with stride != 1")
            out = []
            for k, d in zip(kernel, pair(dilation)):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise Unsupported(f"padding={padding!r}")
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


def axis_index(d, ndim) -> int:
    return d + ndim if d < 0 else d


def flatten(xp, x, start_dim=0, end_dim=-1):
    shape = tuple(x.shape)
    if not shape:
        return xp.reshape(x, (1,))
    s, e = axis_index(start_dim, len(shape)), axis_index(end_dim, len(shape))
    return xp.reshape(x, shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :])


def shape_args(shape):
    # x.view(2, -1) and x.view((2, -1)) both mean shape (2, -1)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


def batch_norm(be, x, mean, var, weight, bias, eps, use_batch_stats):
    xp = be.xp
    if use_batch_stats:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = xp.mean(x, axis=axes)
        var = xp.mean(xp.square(x - channel_view(xp, mean, x.ndim)), axis=axes)
    out = (x - channel_view(xp, mean, x.ndim)) / xp.sqrt(channel_view(xp, var, x.ndim) + eps)
    if weight is not None:
        out = out * channel_view(xp, weight, x.ndim)
    if bias is not None:
        out = out + channel_view(xp, bias, x.ndim)
    return out


def dropout(rt, index, x, p, what):
    if p == 0.0:
        return x
    if p >= 1.0:
        return rt.be.xp.zeros_like(x)
    keep = rt.be.bernoulli(rt.key_for(index, what), 1.0 - p, tuple(x.shape), device=rt.be.device_of(x))
    return rt.be.xp.where(keep, x / (1.0 - p), rt.be.xp.zeros_like(x))


def no_dtype(dtype):
    if dtype is not None:
        raise Unsupported(f"dtype={dtype}")


def pool_checks(kind, dilation=1, ceil_mode=False, return_indices=False, divisor_override=None):
    if pair(static(dilation, "dilation")) != (1, 1):
        raise Unsupported(f"{kind} with dilation != 1")
    if static(ceil_mode, "ceil_mode"):
        raise Unsupported(f"{kind} with ceil_mode=True")
    if static(return_indices, "return_indices"):
        raise Unsupported(f"{kind} with return_indices=True")
    if static(divisor_override, "divisor_override") is not None:
        raise Unsupported(f"{kind} with divisor_override")


def max_pool(be, x, kernel_size, stride, padding):
    k = pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else pair(stride)
    return be.max_pool2d(x, kernel_size=k, stride=s, padding=pair(padding))


def avg_pool(be, x, kernel_size, stride, padding, count_include_pad):
    k = pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else pair(stride)
    return be.avg_pool2d(
        x, kernel_size=k, stride=s, padding=pair(padding), count_include_pad=bool(count_include_pad)
    )


def gelu(be, x, approximate):
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={approximate!r}")
    return be.gelu(x, approximate=approximate == "tanh")


def gelu_check(approximate):
    if static(approximate, "approximate") not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={approximate!r}")


def softmax_dim(dim):
    if static(dim, "dim") is None:
        raise Unsupported("softmax without an explicit dim")
