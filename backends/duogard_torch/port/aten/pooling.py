"""Pooling and resampling: max and average pooling, adaptive average pooling, nearest and
bilinear upsampling (separable matrices where the operator is linear).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..helpers import Unsupported, as_tuple, device_kw, pad_constant
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("pooling", AtenRule)
register = RULES.register


def _as4d(xp, x):
    return (xp.expand_dims(x, axis=0), True) if x.ndim == 3 else (x, False)


def _max_pool_check(node, info):
    args = list(node.args) + [None] * 6
    if args[4] not in (None, 1, [1, 1], (1, 1)):
        raise Unsupported(f"max_pool2d with dilation={args[4]}")


def pool_size(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Torch's pooling output length: with ``ceil_mode`` a last, partial window is kept when
    it starts inside the input or its left padding.
    """
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _lowest(xp, dtype):
    return -math.inf if xp.isdtype(dtype, "real floating") else int(xp.iinfo(dtype).min)


def _windows(rt, x, k, s, p, out):
    """Every window of ``x`` (N, C, H, W) padded with the lowest value (never a maximum): an array
    (N, C, oh, ow, kh * kw), the window's entries in row-major order.
    """
    xp = rt.be.xp
    h, w = int(x.shape[-2]), int(x.shape[-1])
    extra = [max((out[i] - 1) * s[i] + k[i] - (h, w)[i] - p[i], 0) for i in range(2)]
    padded = pad_constant(rt, x, (p[1], extra[1], p[0], extra[0]), _lowest(xp, x.dtype))
    parts = []
    for a in range(k[0]):
        rows = padded[..., a : a + s[0] * (out[0] - 1) + 1 : s[0], :]
        for b in range(k[1]):
            parts.append(rows[..., b : b + s[1] * (out[1] - 1) + 1 : s[1]])
    return xp.stack(parts, axis=-1)


@register(
    aten.max_pool2d_with_indices.default,
    doc="be.max_pool2d; with ceil_mode or the indices read, the windows' xp.argmax "
    "(the first maximum, as torch) and the value there",
    check=_max_pool_check,
    bounded=True,  # the indices address one input plane
)
def _max_pool(rt, info, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    xp = rt.be.xp
    x, unbatched = _as4d(xp, x)
    k = as_tuple(kernel_size, 2)
    s = as_tuple(stride, 2) if stride else k
    p = as_tuple(padding, 2)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    out = tuple(pool_size((h, w)[i], k[i], s[i], p[i], bool(ceil_mode)) for i in range(2))
    if not (info.used_outputs - {0}) and not ceil_mode:
        y = rt.be.max_pool2d(x, kernel_size=k, stride=s, padding=p)
        return (y[0] if unbatched else y), None
    win = _windows(rt, x, k, s, p, out)
    arg = xp.argmax(win, axis=-1, keepdims=True)
    y = xp.squeeze(xp.take_along_axis(win, arg, axis=-1), axis=-1)  # the tangent of that entry
    arg = xp.squeeze(arg, axis=-1)
    # the input position of window (i, j)'s entry (a, b): (i * sh - ph + a) * W + j * sw - pw + b
    top = np.arange(out[0]).reshape(-1, 1) * s[0] - p[0]
    left = np.arange(out[1]).reshape(1, -1) * s[1] - p[1]
    base = rt.be.asarray((top * w + left).astype(np.int64), **device_kw(rt))
    arg = xp.astype(arg, base.dtype)  # int64, or JAX's int32 without its 64-bit mode
    index = base + (arg // k[1]) * w + arg % k[1]
    return (y[0] if unbatched else y), (index[0] if unbatched else index)


def _avg_matrix(n: int, k: int, s: int, p: int, out: int, include_pad: bool, divisor: bool) -> np.ndarray:
    """The (out, n) averaging matrix of one axis, as torch counts a window: it ends at the
    padding's end at most (a ceil_mode window past it is cut), ``include_pad`` (count_include_pad) counts the
    padded part of it, else only its input entries; with ``divisor`` (a divisor_override) ones.
    A window's divisor is the product of its two axes' counts, so a 2-d pooling is separable.
    """
    m = np.zeros((out, n))
    for i in range(out):
        start = i * s - p
        end = min(start + k, n + p)
        lo, hi = max(start, 0), min(end, n)
        count = (end - start) if include_pad else (hi - lo)
        m[i, lo:hi] = 1.0 if divisor else 1.0 / max(count, 1)
    return m


@register(
    aten.avg_pool2d.default,
    doc="be.avg_pool2d; with ceil_mode or divisor_override, separable averaging matrices (xp.matmul)",
)
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
    k = as_tuple(kernel_size, 2)
    s = as_tuple(stride, 2) if stride else k
    p = as_tuple(padding, 2)
    if ceil_mode or divisor_override:
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        mh, mw = (
            _avg_matrix(
                hw[i],
                k[i],
                s[i],
                p[i],
                pool_size(hw[i], k[i], s[i], p[i], bool(ceil_mode)),
                bool(count_include_pad),
                bool(divisor_override),
            )
            for i in range(2)
        )
        y = _resample(rt, x, mh, mw)
        if divisor_override:
            y = y / divisor_override
    else:
        y = rt.be.avg_pool2d(x, kernel_size=k, stride=s, padding=p, count_include_pad=bool(count_include_pad))
    return y[0] if unbatched else y


@register(aten.avg_pool1d.default, doc="be.avg_pool2d over (1, L)")
def _avg_pool1d(rt, info, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    xp = rt.be.xp
    k, s, p = (
        as_tuple(kernel_size, 1)[0],
        (as_tuple(stride, 1) or as_tuple(kernel_size, 1))[0],
        as_tuple(padding, 1)[0],
    )
    y = _avg_pool(
        rt, info, xp.expand_dims(x, axis=x.ndim - 1), (1, k), (1, s), (0, p), ceil_mode, count_include_pad
    )
    return xp.squeeze(y, axis=y.ndim - 2)


# ============================================================================ linear resampling


def _float_type(x):
    """The NumPy type the resampling weights are computed in: float64 for float64 inputs, else
    float32 (torch's accumulation type for float32, float16 and bfloat16).
    """
    return np.float64 if str(x.dtype).removeprefix("torch.") == "float64" else np.float32


def _matrix(rt, m: np.ndarray, like):
    xp = rt.be.xp
    return xp.astype(rt.be.asarray(m.astype(_float_type(like)), **device_kw(rt)), like.dtype)


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


@register(aten._adaptive_avg_pool2d.default, doc="xp.mean, or averaging matrices (xp.matmul)")
def _adaptive_avg_pool(rt, info, x, output_size):
    oh, ow = as_tuple(output_size, 2)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (oh, ow) == (1, 1):
        return rt.be.xp.mean(x, axis=(-2, -1), keepdims=True)
    return _resample(rt, x, _adaptive_matrix(h, oh), _adaptive_matrix(w, ow))


@register(aten.adaptive_avg_pool1d.default, doc="averaging matrix (xp.matmul)")
def _adaptive_avg_pool1d(rt, info, x, output_size):
    xp = rt.be.xp
    m = _adaptive_matrix(int(x.shape[-1]), as_tuple(output_size, 1)[0])
    return xp.matmul(x, xp.matrix_transpose(_matrix(rt, m, x)))


def _out_sizes(x, output_size, scale_factors):
    if output_size is not None:
        return as_tuple(output_size, 2), (None, None)
    scales = tuple(float(s) for s in scale_factors)
    return tuple(int(math.floor(int(n) * s)) for n, s in zip(x.shape[-2:], scales)), scales


def _nearest_index(n_in, n_out, scale):
    ratio = np.float32(1.0 / scale if scale else n_in / n_out)
    dst = np.arange(n_out, dtype=np.float32)
    return np.minimum(np.floor(dst * ratio).astype(np.int64), n_in - 1)


@register(aten.upsample_nearest2d.vec, doc="xp.take of the nearest source rows and columns")
def _upsample_nearest(rt, info, x, output_size, scale_factors):
    xp = rt.be.xp
    (oh, ow), (sh, sw) = _out_sizes(x, output_size, scale_factors)
    ih = _nearest_index(int(x.shape[-2]), oh, sh)
    iw = _nearest_index(int(x.shape[-1]), ow, sw)
    y = xp.take(x, rt.be.asarray(ih.astype(np.int32), **device_kw(rt)), axis=x.ndim - 2)
    return xp.take(y, rt.be.asarray(iw.astype(np.int32), **device_kw(rt)), axis=x.ndim - 1)


def _linear_matrix(n_in, n_out, align_corners, scale, ftype):
    """The interpolation weights, the source coordinates computed in ``ftype`` as torch does."""
    if align_corners:
        ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale else n_in / n_out
    ratio = ftype(ratio)
    m = np.zeros((n_out, n_in))
    for dst in range(n_out):
        if align_corners:
            src = ratio * ftype(dst)
        else:
            src = max(ratio * (ftype(dst) + ftype(0.5)) - ftype(0.5), ftype(0.0))
        i0 = int(np.floor(src))
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        lam = float(src) - i0
        m[dst, i0] += 1.0 - lam
        m[dst, i1] += lam
    return m


@register(aten.upsample_bilinear2d.vec, doc="interpolation matrices (xp.matmul)")
def _upsample_bilinear(rt, info, x, output_size, align_corners, scale_factors):
    (oh, ow), (sh, sw) = _out_sizes(x, output_size, scale_factors)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ft = _float_type(x)
    return _resample(
        rt, x, _linear_matrix(h, oh, align_corners, sh, ft), _linear_matrix(w, ow, align_corners, sw, ft)
    )
