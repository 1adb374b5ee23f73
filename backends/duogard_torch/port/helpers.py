"""Helpers of the lowering rules (:mod:`.rules`): argument normalisation, and the ops several rules
share (batch norm, dropout, pooling, GELU).
"""

from __future__ import annotations

import math

import torch
import torch.fx


class Unsupported(Exception):  # noqa: N818 - a signal between rule builders, caught in lower.py
    """Raised by a rule builder: this node cannot be lowered (the message says why)."""


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _static(value, what: str):
    """A trace-time constant argument (an fx Node here means it depends on data)."""
    if isinstance(value, torch.fx.Node):
        raise Unsupported(f"{what} must be a constant, not computed from tensors")
    return value


def _conv_padding(padding, kernel, dilation, stride):
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if _pair(stride) != (1, 1):
                raise Unsupported("padding='same' with stride != 1")
            out = []
            for k, d in zip(kernel, _pair(dilation)):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise Unsupported(f"padding={padding!r}")
    ph, pw = _pair(padding)
    return ((ph, ph), (pw, pw))


def _dim(d, ndim) -> int:
    return d + ndim if d < 0 else d


def _flatten(xp, x, start_dim=0, end_dim=-1):
    shape = tuple(x.shape)
    if not shape:
        return xp.reshape(x, (1,))
    s, e = _dim(start_dim, len(shape)), _dim(end_dim, len(shape))
    return xp.reshape(x, shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :])


def _shape_args(shape):
    # x.view(2, -1) and x.view((2, -1)) both mean shape (2, -1)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


def _channel_view(xp, v, ndim):
    return xp.reshape(v, (1, -1) + (1,) * (ndim - 2))


def _batch_norm(be, x, mean, var, weight, bias, eps, use_batch_stats):
    xp = be.xp
    if use_batch_stats:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = xp.mean(x, axis=axes)
        var = xp.mean(xp.square(x - _channel_view(xp, mean, x.ndim)), axis=axes)
    out = (x - _channel_view(xp, mean, x.ndim)) / xp.sqrt(_channel_view(xp, var, x.ndim) + eps)
    if weight is not None:
        out = out * _channel_view(xp, weight, x.ndim)
    if bias is not None:
        out = out + _channel_view(xp, bias, x.ndim)
    return out


def _dropout(rt, index, x, p, what):
    if p == 0.0:
        return x
    if p >= 1.0:
        return rt.be.xp.zeros_like(x)
    keep = rt.be.bernoulli(rt.key_for(index, what), 1.0 - p, tuple(x.shape), device=rt.be.device_of(x))
    return rt.be.xp.where(keep, x / (1.0 - p), rt.be.xp.zeros_like(x))


def _no_dtype(dtype):
    if dtype is not None:
        raise Unsupported(f"dtype={dtype}")


def _pool_checks(kind, dilation=1, ceil_mode=False, return_indices=False, divisor_override=None):
    if _pair(_static(dilation, "dilation")) != (1, 1):
        raise Unsupported(f"{kind} with dilation != 1")
    if _static(ceil_mode, "ceil_mode"):
        raise Unsupported(f"{kind} with ceil_mode=True")
    if _static(return_indices, "return_indices"):
        raise Unsupported(f"{kind} with return_indices=True")
    if _static(divisor_override, "divisor_override") is not None:
        raise Unsupported(f"{kind} with divisor_override")


def _max_pool(be, x, kernel_size, stride, padding):
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else _pair(stride)
    return be.max_pool2d(x, kernel_size=k, stride=s, padding=_pair(padding))


def _avg_pool(be, x, kernel_size, stride, padding, count_include_pad):
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else _pair(stride)
    return be.avg_pool2d(
        x, kernel_size=k, stride=s, padding=_pair(padding), count_include_pad=bool(count_include_pad)
    )


def _gelu(be, x, approximate):
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={approximate!r}")
    return be.gelu(x, approximate=approximate == "tanh")


def _softmax_dim(dim):
    if _static(dim, "dim") is None:
        raise Unsupported("softmax without an explicit dim")


def training_key(be, key, index: int, what: str):
    """The key of a lowered graph's ``index``-th random op (dropout): ``fold_in(key, index)``;
    training mode without a key is an error naming ``what`` and how to pass one.
    """
    if key is None:
        raise ValueError(
            f"{what} in training mode needs an explicit random key: "
            "model.apply(params, x, train=True, key=be.key(seed))"
        )
    return be.fold_in(key, index)
