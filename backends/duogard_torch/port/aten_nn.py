"""The core ATen rules for nn operators (convolution, normalisation, pooling, resampling,
dropout, softmax, embedding): part of the table of :mod:`.aten`.

Each rule is ``fn(rt, info, *args, **kwargs)`` with the operator's schema arguments; see
:class:`~duogard_torch.port.aten.AtenRule`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .aten import AtenRule, device_kw
from .aten_core import _pad, _slice
from .helpers import Unsupported

__all__ = ["nn_rules"]

aten = torch.ops.aten


def _tuple(v, n):
    if isinstance(v, int):
        return (int(v),) * n
    v = tuple(int(s) for s in v)
    return v * n if len(v) == 1 else v


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
    return _slice(xp.reshape(e, shape), axis, 0, (n - 1) * s + 1)


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
    x = _pad(rt, x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    return rt.be.conv2d(
        x, wt, b, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=tuple(dilation), groups=groups
    )


def _convolution(rt, info, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    xp = rt.be.xp
    one_d = w.ndim == 3
    if one_d:  # (N, C, L) as (N, C, 1, L)
        x, w = xp.expand_dims(x, axis=2), xp.expand_dims(w, axis=2)
        stride, padding, dilation = (
            (1, *_tuple(stride, 1)),
            (0, *_tuple(padding, 1)),
            (1, *_tuple(dilation, 1)),
        )
        output_padding = (0, *_tuple(output_padding, 1))
    stride, padding, dilation = _tuple(stride, 2), _tuple(padding, 2), _tuple(dilation, 2)
    if transposed:
        y = _conv_transpose2d(rt, x, w, b, stride, padding, dilation, _tuple(output_padding, 2), int(groups))
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


def _convolution_check(node, info):
    weight = node.args[1]
    ndim = len(weight.meta["val"].shape) if hasattr(weight, "meta") and "val" in weight.meta else 4
    if ndim not in (3, 4):
        raise Unsupported(f"a {ndim - 2}-D convolution (1-D and 2-D are lowered)")


# ============================================================================ normalisation


def _channel(xp, v, ndim):
    return xp.reshape(v, (1, -1) + (1,) * (ndim - 2))


def _affine(xp, out, weight, bias):
    if weight is not None:
        out = out * _channel(xp, weight, out.ndim)
    if bias is not None:
        out = out + _channel(xp, bias, out.ndim)
    return out


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
    var = xp.mean(xp.square(x - _channel(xp, mean, x.ndim)), axis=axes)
    return mean, var, math.prod(int(x.shape[a]) for a in axes)


def _normalize(xp, x, mean, var, weight, bias, eps):
    invstd = 1.0 / xp.sqrt(var + eps)
    out = (x - _channel(xp, mean, x.ndim)) * _channel(xp, invstd, x.ndim)
    return _affine(xp, out, weight, bias), invstd


def _bn_no_training(rt, info, x, weight, bias, running_mean, running_var, momentum, eps):
    out, _ = _normalize(rt.be.xp, x, running_mean, running_var, weight, bias, eps)
    return out, None, None


def _bn_no_stats(rt, info, x, weight, bias, training, momentum, eps):
    xp = rt.be.xp
    mean, var, _ = _batch_stats(xp, x)
    out, invstd = _normalize(xp, x, mean, var, weight, bias, eps)
    return out, mean, invstd


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


def _native_bn(rt, info, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training or running_mean is None:
        return _bn_no_stats(rt, info, x, weight, bias, training, momentum, eps)
    return _bn_no_training(rt, info, x, weight, bias, running_mean, running_var, momentum, eps)


def _native_bn_check(node, info):
    training, running_mean = node.args[5], node.args[3]
    if training and running_mean is not None:
        raise Unsupported("native_batch_norm in training mode updates running statistics in place")


def _only_first_output(what):
    def check(node, info):
        if info.used_outputs - {0}:
            raise Unsupported(f"{what}'s outputs {sorted(info.used_outputs - {0})} are read")

    return check


# ============================================================================ dropout, softmax, embedding


def _dropout(rt, info, x, p, train):
    xp = rt.be.xp
    if not train or p == 0.0:
        return x, xp.ones_like(x, dtype=xp.bool)
    if p >= 1.0:
        return xp.zeros_like(x), xp.zeros_like(x, dtype=xp.bool)
    key = rt.key_for(info.extra["dropout_index"], f"dropout {info.path or 'of the root module'}")
    keep = rt.be.bernoulli(key, 1.0 - p, tuple(x.shape), device=rt.be.device_of(x))
    return xp.where(keep, x / (1.0 - p), xp.zeros_like(x)), keep


def _embedding(rt, info, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    xp = rt.be.xp
    flat = xp.take(weight, xp.reshape(indices, (-1,)), axis=0)
    return xp.reshape(flat, tuple(indices.shape) + (int(weight.shape[-1]),))


# ============================================================================ pooling, resampling


def _as4d(xp, x):
    return (xp.expand_dims(x, axis=0), True) if x.ndim == 3 else (x, False)


def _max_pool(rt, info, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    xp = rt.be.xp
    x, unbatched = _as4d(xp, x)
    k = _tuple(kernel_size, 2)
    s = _tuple(stride, 2) if stride else k
    y = rt.be.max_pool2d(x, kernel_size=k, stride=s, padding=_tuple(padding, 2))
    return (y[0] if unbatched else y), None


def _max_pool_check(node, info):
    _only_first_output("max_pool2d_with_indices")(node, info)
    args = list(node.args) + [None] * 6
    if args[4] not in (None, 1, [1, 1], (1, 1)):
        raise Unsupported(f"max_pool2d with dilation={args[4]}")
    if args[5]:
        raise Unsupported("max_pool2d with ceil_mode=True")


def _avg_pool(
    rt,
    info,
    x,
    kernel_size,
    stride=(),
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    xp = rt.be.xp
    x, unbatched = _as4d(xp, x)
    k = _tuple(kernel_size, 2)
    s = _tuple(stride, 2) if stride else k
    y = rt.be.avg_pool2d(
        x, kernel_size=k, stride=s, padding=_tuple(padding, 2), count_include_pad=bool(count_include_pad)
    )
    return y[0] if unbatched else y


def _avg_pool_check(node, info):
    args = list(node.args) + [None] * 7
    if args[4]:
        raise Unsupported("avg_pool2d with ceil_mode=True")
    if args[6] is not None:
        raise Unsupported("avg_pool2d with divisor_override")


def _matrix(rt, m: np.ndarray, like):
    xp = rt.be.xp
    return xp.astype(rt.be.asarray(m.astype(np.float32), **device_kw(rt)), like.dtype)


def _resample(rt, x, mh: np.ndarray, mw: np.ndarray):
    """``mh @ x @ mw.T`` over the last two axes: a separable linear resampling."""
    xp = rt.be.xp
    y = xp.matmul(_matrix(rt, mh, x), x)
    return xp.matmul(y, xp.matrix_transpose(_matrix(rt, mw, x)))


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _adaptive_avg_pool(rt, info, x, output_size):
    oh, ow = _tuple(output_size, 2)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (oh, ow) == (1, 1):
        return rt.be.xp.mean(x, axis=(-2, -1), keepdims=True)
    return _resample(rt, x, _adaptive_matrix(h, oh), _adaptive_matrix(w, ow))


def _avg_pool1d(rt, info, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    xp = rt.be.xp
    k, s, p = (
        _tuple(kernel_size, 1)[0],
        (_tuple(stride, 1) or _tuple(kernel_size, 1))[0],
        _tuple(padding, 1)[0],
    )
    y = _avg_pool(
        rt, info, xp.expand_dims(x, axis=x.ndim - 1), (1, k), (1, s), (0, p), ceil_mode, count_include_pad
    )
    return xp.squeeze(y, axis=y.ndim - 2)


def _adaptive_avg_pool1d(rt, info, x, output_size):
    xp = rt.be.xp
    m = _adaptive_matrix(int(x.shape[-1]), _tuple(output_size, 1)[0])
    return xp.matmul(x, xp.matrix_transpose(_matrix(rt, m, x)))


def _out_sizes(x, output_size, scale_factors):
    if output_size is not None:
        return _tuple(output_size, 2), (None, None)
    scales = tuple(float(s) for s in scale_factors)
    return tuple(int(math.floor(int(n) * s)) for n, s in zip(x.shape[-2:], scales)), scales


def _nearest_index(n_in, n_out, scale):
    ratio = np.float32(1.0 / scale if scale else n_in / n_out)
    dst = np.arange(n_out, dtype=np.float32)
    return np.minimum(np.floor(dst * ratio).astype(np.int64), n_in - 1)


def _upsample_nearest(rt, info, x, output_size, scale_factors):
    xp = rt.be.xp
    (oh, ow), (sh, sw) = _out_sizes(x, output_size, scale_factors)
    ih = _nearest_index(int(x.shape[-2]), oh, sh)
    iw = _nearest_index(int(x.shape[-1]), ow, sw)
    y = xp.take(x, rt.be.asarray(ih.astype(np.int32), **device_kw(rt)), axis=x.ndim - 2)
    return xp.take(y, rt.be.asarray(iw.astype(np.int32), **device_kw(rt)), axis=x.ndim - 1)


def _linear_matrix(n_in, n_out, align_corners, scale):
    if align_corners:
        ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale else n_in / n_out
    ratio = np.float32(ratio)
    m = np.zeros((n_out, n_in))
    for dst in range(n_out):
        if align_corners:
            src = ratio * np.float32(dst)
        else:
            src = max(ratio * (np.float32(dst) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
        i0 = int(np.floor(src))
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        lam = float(src) - i0
        m[dst, i0] += 1.0 - lam
        m[dst, i1] += lam
    return m


def _upsample_bilinear(rt, info, x, output_size, align_corners, scale_factors):
    (oh, ow), (sh, sw) = _out_sizes(x, output_size, scale_factors)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return _resample(
        rt, x, _linear_matrix(h, oh, align_corners, sh), _linear_matrix(w, ow, align_corners, sw)
    )


def nn_rules() -> dict:
    """The nn operators' rules (merged into :func:`duogard_torch.port.aten.rules`)."""
    R = AtenRule
    return {
        aten.convolution.default: R(
            _convolution,
            "be.conv2d (1-D as 2-D; transposed: zero-dilated input, flipped kernel)",
            _convolution_check,
        ),
        aten.native_layer_norm.default: R(_layer_norm, "be.layer_norm"),
        aten.native_group_norm.default: R(_group_norm, "xp.mean over each group, xp.sqrt"),
        aten._native_batch_norm_legit_no_training.default: R(_bn_no_training, "running statistics, xp.sqrt"),
        aten._native_batch_norm_legit.no_stats: R(_bn_no_stats, "batch statistics, xp.mean, xp.sqrt"),
        aten._native_batch_norm_legit_functional.default: R(
            _bn_functional, "batch statistics; new running statistics returned as new buffers"
        ),
        aten.native_batch_norm.default: R(_native_bn, "batch or running statistics", _native_bn_check),
        aten.native_dropout.default: R(
            _dropout, "be.bernoulli(be.fold_in(key, i), 1 - p): the i-th dropout of the graph"
        ),
        aten._softmax.default: R(
            lambda rt, info, x, dim, half_to_float=False: rt.be.softmax(x, axis=dim), "be.softmax"
        ),
        aten._log_softmax.default: R(
            lambda rt, info, x, dim, half_to_float=False: rt.be.log_softmax(x, axis=dim), "be.log_softmax"
        ),
        aten.embedding.default: R(_embedding, "xp.take"),
        aten.max_pool2d_with_indices.default: R(_max_pool, "be.max_pool2d (values only)", _max_pool_check),
        aten.avg_pool2d.default: R(_avg_pool, "be.avg_pool2d", _avg_pool_check),
        aten.avg_pool1d.default: R(_avg_pool1d, "be.avg_pool2d over (1, L)", _avg_pool_check),
        aten.adaptive_avg_pool1d.default: R(_adaptive_avg_pool1d, "averaging matrix (xp.matmul)"),
        aten._adaptive_avg_pool2d.default: R(
            _adaptive_avg_pool, "xp.mean, or averaging matrices (xp.matmul)"
        ),
        aten.upsample_nearest2d.vec: R(_upsample_nearest, "xp.take of the nearest source rows and columns"),
        aten.upsample_bilinear2d.vec: R(_upsample_bilinear, "interpolation matrices (xp.matmul)"),
    }
