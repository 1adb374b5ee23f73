"""Layer operators: convolution (1-D, 2-D, transposed), normalisation (layer, group, batch),
dropout, softmax, embedding.
"""

from __future__ import annotations

import math

import torch

from ..helpers import Unsupported, as_tuple, channel_view, device_kw, dtype_of, pad_constant, slice_axis
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("layers", AtenRule)
register = RULES.register


# ============================================================================ convolution


def _dilate(xp, x, axis, s):
    """Insert ``s - 1`` zeros between the entries of ``x`` along ``axis`` (the transposed
    convolution's input).
    """
    if s == 1:
        return x
    n = int(x.shape[axis])
    e = xp.expand_dims(x, axis=axis + 1)
    e = xp.concat([e] + [xp.zeros_like(e)] * (s - 1), axis=axis + 1)
    shape = tuple(x.shape[:axis]) + (n * s,) + tuple(x.shape[axis + 1 :])
    return slice_axis(xp.reshape(e, shape), axis, 0, (n - 1) * s + 1)


def _conv_transpose2d(rt, x, w, b, stride, padding, dilation, output_padding, groups):
    xp = rt.be.xp
    cin, cout_g, kh, kw = (int(s) for s in w.shape)
    # the transposed convolution is a convolution of the zero-dilated input with the flipped
    # kernel, its in/out channels swapped within each group
    wg = xp.reshape(w, (groups, cin // groups, cout_g, kh, kw))
    wg = xp.permute_dims(wg, (0, 2, 1, 3, 4))
    wt = xp.flip(xp.reshape(wg, (groups * cout_g, cin // groups, kh, kw)), axis=(2, 3))
    x = _dilate(xp, _dilate(xp, x, 2, stride[0]), 3, stride[1])
    pads = []
    for k, p, d, op in zip((kh, kw), padding, dilation, output_padding):
        lo = d * (k - 1) - p
        pads.append((lo, lo + op))
    x = pad_constant(rt, x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    return rt.be.conv2d(
        x, wt, b, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=tuple(dilation), groups=groups
    )


def _convolution_check(node, info):
    weight = node.args[1]
    ndim = len(weight.meta["val"].shape) if hasattr(weight, "meta") and "val" in weight.meta else 4
    if ndim not in (3, 4):
        raise Unsupported(f"a {ndim - 2}-D convolution (1-D and 2-D are lowered)")


@register(
    aten.convolution.default,
    doc="be.conv2d (1-D as 2-D; transposed: zero-dilated input, flipped kernel)",
    check=_convolution_check,
)
def _convolution(rt, info, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    xp = rt.be.xp
    one_d = w.ndim == 3
    if one_d:  # (N, C, L) as (N, C, 1, L)
        x, w = xp.expand_dims(x, axis=2), xp.expand_dims(w, axis=2)
        stride, padding, dilation = (
            (1, *as_tuple(stride, 1)),
            (0, *as_tuple(padding, 1)),
            (1, *as_tuple(dilation, 1)),
        )
        output_padding = (0, *as_tuple(output_padding, 1))
    stride, padding, dilation = as_tuple(stride, 2), as_tuple(padding, 2), as_tuple(dilation, 2)
    if transposed:
        y = _conv_transpose2d(
            rt, x, w, b, stride, padding, dilation, as_tuple(output_padding, 2), int(groups)
        )
    else:
        y = rt.be.conv2d(
            x,
            w,
            b,
            stride=stride,
            padding=((padding[0], padding[0]), (padding[1], padding[1])),
            dilation=dilation,
            groups=int(groups),
        )
    return xp.squeeze(y, axis=2) if one_d else y


# ============================================================================ normalisation


def _affine(xp, out, weight, bias):
    if weight is not None:
        out = out * channel_view(xp, weight, out.ndim)
    if bias is not None:
        out = out + channel_view(xp, bias, out.ndim)
    return out


@register(aten.native_layer_norm.default, doc="be.layer_norm")
def _layer_norm(rt, info, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    xp = rt.be.xp
    n = len(normalized_shape)
    out = rt.be.layer_norm(x, weight, bias, normalized_ndim=n, eps=float(eps))
    if info.used_outputs <= {0}:
        return out, None, None
    axes = tuple(range(x.ndim - n, x.ndim))
    mean = xp.mean(x, axis=axes, keepdims=True)
    var = xp.mean(xp.square(x - mean), axis=axes, keepdims=True)
    return out, mean, 1.0 / xp.sqrt(var + eps)


@register(aten.native_group_norm.default, doc="xp.mean over each group, xp.sqrt")
def _group_norm(rt, info, x, weight, bias, N, C, HxW, group, eps):
    xp = rt.be.xp
    xr = xp.reshape(x, (int(N), int(group), -1))
    mean = xp.mean(xr, axis=-1, keepdims=True)
    var = xp.mean(xp.square(xr - mean), axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    out = _affine(xp, xp.reshape((xr - mean) * rstd, tuple(x.shape)), weight, bias)
    return out, xp.reshape(mean, (int(N), int(group))), xp.reshape(rstd, (int(N), int(group)))


def _batch_stats(xp, x):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = xp.mean(x, axis=axes)
    var = xp.mean(xp.square(x - channel_view(xp, mean, x.ndim)), axis=axes)
    return mean, var, math.prod(int(x.shape[a]) for a in axes)


def _normalize(xp, x, mean, var, weight, bias, eps):
    invstd = 1.0 / xp.sqrt(var + eps)
    out = (x - channel_view(xp, mean, x.ndim)) * channel_view(xp, invstd, x.ndim)
    return _affine(xp, out, weight, bias), invstd


@register(aten._native_batch_norm_legit_no_training.default, doc="running statistics, xp.sqrt")
def _bn_no_training(rt, info, x, weight, bias, running_mean, running_var, momentum, eps):
    out, _ = _normalize(rt.be.xp, x, running_mean, running_var, weight, bias, eps)
    return out, None, None


@register(aten._native_batch_norm_legit.no_stats, doc="batch statistics, xp.mean, xp.sqrt")
def _bn_no_stats(rt, info, x, weight, bias, training, momentum, eps):
    xp = rt.be.xp
    mean, var, _ = _batch_stats(xp, x)
    out, invstd = _normalize(xp, x, mean, var, weight, bias, eps)
    return out, mean, invstd


@register(
    aten._native_batch_norm_legit_functional.default,
    doc="batch statistics; new running statistics returned as new buffers",
)
def _bn_functional(rt, info, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Batch norm that returns its new running statistics (never updates them in place)."""
    xp = rt.be.xp
    if not training:
        out, _ = _normalize(xp, x, running_mean, running_var, weight, bias, eps)
        return out, None, None, running_mean, running_var
    mean, var, n = _batch_stats(xp, x)
    out, invstd = _normalize(xp, x, mean, var, weight, bias, eps)
    counter = info.extra.get("cumulative")  # momentum=None: the cumulative average
    m = 1.0 / (xp.astype(rt.params[counter], mean.dtype) + 1.0) if counter else momentum
    unbiased = var * (n / max(n - 1, 1))
    new_mean = (1.0 - m) * running_mean + m * xp.astype(mean, running_mean.dtype)
    new_var = (1.0 - m) * running_var + m * xp.astype(unbiased, running_var.dtype)
    return out, mean, invstd, new_mean, new_var


def _native_bn_check(node, info):
    training, running_mean = node.args[5], node.args[3]
    if training and running_mean is not None:
        raise Unsupported("native_batch_norm in training mode updates running statistics in place")


@register(aten.native_batch_norm.default, doc="batch or running statistics", check=_native_bn_check)
def _native_bn(rt, info, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training or running_mean is None:
        return _bn_no_stats(rt, info, x, weight, bias, training, momentum, eps)
    return _bn_no_training(rt, info, x, weight, bias, running_mean, running_var, momentum, eps)


# ============================================================================ dropout, softmax, embedding


@register(
    aten.native_dropout.default,
    doc="be.bernoulli(be.fold_in(key, i), 1 - p): the i-th dropout of the graph",
)
def _dropout(rt, info, x, p, train):
    xp = rt.be.xp
    if not train or p == 0.0:
        return x, xp.ones_like(x, dtype=xp.bool)
    if p >= 1.0:
        return xp.zeros_like(x), xp.zeros_like(x, dtype=xp.bool)
    key = rt.key_for(info.extra["dropout_index"], f"dropout {info.path or 'of the root module'}")
    keep = rt.be.bernoulli(key, 1.0 - p, tuple(x.shape), device=rt.be.device_of(x))
    return xp.where(keep, x / (1.0 - p), xp.zeros_like(x)), keep


def _bernoulli_check(node, info):
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    if not isinstance(p, (int, float)):
        raise Unsupported(f"bernoulli with a probability of type {type(p).__name__}")


@register(
    aten.bernoulli.p,
    doc="be.bernoulli(be.fold_in(key, i), p) in x's dtype: the graph's i-th random draw, as a dropout's "
    "(in-place dropout, stochastic depth)",
    check=_bernoulli_check,
)
def _bernoulli(rt, info, x, p=0.5, generator=None):
    key = rt.key_for(info.extra["dropout_index"], f"bernoulli draw {info.path or 'of the root module'}")
    keep = rt.be.bernoulli(key, float(p), tuple(x.shape), device=rt.be.device_of(x))
    return rt.be.xp.astype(keep, x.dtype)


def _tensor_draw_check(node, info):
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    if not hasattr(p, "meta"):  # a graph node (a tensor of probabilities); a float is bernoulli.p
        raise Unsupported(f"bernoulli with a probability of type {type(p).__name__}")


@register(
    aten.bernoulli.Tensor,
    doc="be.uniform(be.fold_in(key, i)) < p in x's dtype: the graph's i-th random draw, one "
    "probability per entry (``x.bernoulli_(p)``)",
    check=_tensor_draw_check,
)
def _bernoulli_tensor(rt, info, x, p, generator=None):
    key = rt.key_for(info.extra["dropout_index"], f"bernoulli draw {info.path or 'of the root module'}")
    xp = rt.be.xp
    p = xp.broadcast_to(p, tuple(x.shape))
    keep = rt.be.uniform(key, tuple(x.shape), dtype=p.dtype, device=rt.be.device_of(x)) < p
    return xp.astype(keep, x.dtype)


@register(
    aten.rand.default,
    doc="be.uniform(be.fold_in(key, i)): the graph's i-th random draw (``torch.rand``; "
    "``torch.bernoulli(p)`` captures as ``rand(...) < p``)",
)
def _rand(rt, info, size, dtype=None, layout=None, device=None, pin_memory=None):
    key = rt.key_for(info.extra["dropout_index"], f"rand draw {info.path or 'of the root module'}")
    dt = dtype_of(rt.be, dtype if dtype is not None else torch.float32)
    return rt.be.uniform(key, tuple(int(s) for s in size), dtype=dt, **device_kw(rt))


@register(aten._softmax.default, doc="be.softmax")
def _softmax(rt, info, x, dim, half_to_float=False):
    return rt.be.softmax(x, axis=dim)


@register(aten._log_softmax.default, doc="be.log_softmax")
def _log_softmax(rt, info, x, dim, half_to_float=False):
    return rt.be.log_softmax(x, axis=dim)


@register(aten.embedding.default, doc="xp.take")
def _embedding(rt, info, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    xp = rt.be.xp
    flat = xp.take(weight, xp.reshape(indices, (-1,)), axis=0)
    return xp.reshape(flat, tuple(indices.shape) + (int(weight.shape[-1]),))
