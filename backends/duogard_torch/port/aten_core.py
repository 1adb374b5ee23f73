"""The core ATen rules for elementwise, reduction, shape, indexing and creation operators:
part of the table of :mod:`.aten`.

Each rule is ``fn(rt, info, *args, **kwargs)`` with the operator's schema arguments; see
:class:`~duogard_torch.port.aten.AtenRule`.
"""

from __future__ import annotations

import math
import operator

import torch

from .aten import AtenRule, axis_of, device_kw, dtype_of
from .helpers import Unsupported

__all__ = ["core_rules"]

aten = torch.ops.aten


def _where_clamp(xp, x, lo, hi):
    # torch's clamp passes the gradient at the bounds (inclusive); minimum/maximum split it
    if lo is not None:
        x = xp.where(x < lo, xp.asarray(lo, dtype=x.dtype) if not hasattr(lo, "shape") else lo, x)
    if hi is not None:
        x = xp.where(x > hi, xp.asarray(hi, dtype=x.dtype) if not hasattr(hi, "shape") else hi, x)
    return x


def _expand(xp, x, size):
    size = list(size)
    lead = len(size) - x.ndim
    shape = tuple(int(x.shape[i - lead]) if s == -1 else int(s) for i, s in enumerate(size))
    return xp.broadcast_to(x, shape)


def _slice(x, dim, start=None, end=None, step=1):
    index = [slice(None)] * x.ndim
    index[dim % x.ndim] = slice(start, end, step)
    return x[tuple(index)]


def _select(x, dim, index):
    ix = [slice(None)] * x.ndim
    ix[dim % x.ndim] = int(index)
    return x[tuple(ix)]


def _split_sizes(x, sizes, dim):
    out, start = [], 0
    for s in sizes:
        out.append(_slice(x, dim, start, start + int(s)))
        start += int(s)
    return out


def _split(x, size, dim):
    n = int(x.shape[dim])
    return _split_sizes(x, [min(size, n - s) for s in range(0, n, size)] or [0], dim)


def _squeeze(xp, x, dims):
    dims = tuple(d % x.ndim for d in dims if x.shape[d] == 1) if x.ndim else ()
    return xp.squeeze(x, axis=dims) if dims else x


def _pad(rt, x, pad, value=0.0):
    xp = rt.be.xp
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        left, right = int(pad[2 * i]), int(pad[2 * i + 1])
        if left < 0:
            x, left = _slice(x, axis, -left, None), 0
        if right < 0:
            x, right = _slice(x, axis, 0, int(x.shape[axis]) + right), 0
        parts = []
        for width in (left, right):
            shape = list(x.shape)
            shape[axis] = width
            parts.append(xp.full(tuple(shape), value, dtype=x.dtype, **device_kw(rt)) if width else None)
        x = xp.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)
    return x


def _norm(xp, x, ord=2, dim=None, keepdim=False, dtype=None):
    axis = axis_of(dim, x.ndim)
    if dtype is not None:
        raise Unsupported(f"dtype={dtype}")
    a = xp.abs(x)
    if ord == math.inf:
        return xp.max(a, axis=axis, keepdims=keepdim)
    if ord == -math.inf:
        return xp.min(a, axis=axis, keepdims=keepdim)
    if ord == 0:
        return xp.sum(xp.astype(x != 0, x.dtype), axis=axis, keepdims=keepdim)
    if ord == 1:
        return xp.sum(a, axis=axis, keepdims=keepdim)
    if ord == 2:
        return xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=keepdim))
    return xp.sum(a**ord, axis=axis, keepdims=keepdim) ** (1.0 / ord)


def _var(xp, x, dim=None, correction=None, keepdim=False):
    axis = axis_of(dim, x.ndim)
    return xp.var(x, axis=axis, correction=1 if correction is None else correction, keepdims=keepdim)


def _reduce(name):
    def fn(rt, info, x, dim=None, keepdim=False, dtype=None):
        out = getattr(rt.be.xp, name)(x, axis=axis_of(dim, x.ndim), keepdims=keepdim)
        return out if dtype is None else rt.be.xp.astype(out, dtype_of(rt.be, dtype))

    return fn


def _max_dim(reducer, arg):
    def fn(rt, info, x, dim, keepdim=False):
        xp = rt.be.xp
        return getattr(xp, reducer)(x, axis=dim, keepdims=keepdim), getattr(xp, arg)(
            x, axis=dim, keepdims=keepdim
        )

    return fn


def _arg(name):
    def fn(rt, info, x, dim=None, keepdim=False):
        xp = rt.be.xp
        if dim is None:
            out = getattr(xp, name)(xp.reshape(x, (-1,)), axis=0)
            return xp.reshape(out, (1,) * x.ndim) if keepdim else out
        return getattr(xp, name)(x, axis=dim, keepdims=keepdim)

    return fn


def _binary(op, alpha=False):
    if alpha:
        return lambda rt, info, a, b, alpha=1: op(a, b if alpha == 1 else b * alpha)
    return lambda rt, info, a, b: op(a, b)


def _xp(name):
    return lambda rt, info, x: getattr(rt.be.xp, name)(x)


def _be(name):
    return lambda rt, info, x: getattr(rt.be, name)(x)


def _div_mode(rt, info, a, b, rounding_mode=None):
    xp = rt.be.xp
    q = a / b
    if rounding_mode == "floor":
        return xp.floor(q) if not _is_int(a, b) else xp.floor_divide(a, b)
    if rounding_mode == "trunc":
        t = xp.trunc(q)
        return xp.astype(t, a.dtype) if _is_int(a, b) else t
    return q


def _fmod(rt, info, a, b):
    # C's fmod (the sign of a) from the array API's remainder (the sign of b); exact for ints
    xp = rt.be.xp
    r = xp.remainder(a, b)
    return xp.where((r != 0) & ((r < 0) != (a < 0)), r - b, r)


def _is_int(*values) -> bool:
    return all(not hasattr(v, "dtype") or "int" in str(v.dtype) for v in values)


def _cmp(name):
    return lambda rt, info, a, b: getattr(rt.be.xp, name)(a, b)


def _getitem(rt, info, obj, index):
    return obj[index]


def _stack(rt, info, tensors, dim=0):
    return rt.be.xp.stack(list(tensors), axis=dim)


def _index(rt, info, x, indices):
    ix = tuple(slice(None) if i is None else i for i in indices)
    return x[ix]


def _embedding_like_take(rt, info, x, dim, index):
    return rt.be.xp.take(x, index, axis=dim % x.ndim)


def _cumsum(rt, info, x, dim, dtype=None):
    out = rt.be.xp.cumulative_sum(x, axis=dim % x.ndim)
    return out if dtype is None else rt.be.xp.astype(out, dtype_of(rt.be, dtype))


def _addmm(rt, info, bias, a, b, beta=1, alpha=1):
    xp = rt.be.xp
    prod = xp.matmul(a, b)
    return (bias if beta == 1 else beta * bias) + (prod if alpha == 1 else alpha * prod)


def _to_copy(rt, info, x, dtype=None, **_):
    return x if dtype is None else rt.be.xp.astype(x, dtype_of(rt.be, dtype))


def _identity(rt, info, x, *args, **kwargs):
    return x


def _noop(rt, info, *args, **kwargs):
    return None


def core_rules() -> dict:
    """The core operators' rules (merged into :func:`duogard_torch.port.aten.rules`)."""
    R = AtenRule
    xp_unary = {
        "abs": "abs",
        "neg": "negative",
        "exp": "exp",
        "log": "log",
        "log1p": "log1p",
        "expm1": "expm1",
        "log2": "log2",
        "log10": "log10",
        "sqrt": "sqrt",
        "sin": "sin",
        "cos": "cos",
        "tan": "tan",
        "asin": "asin",
        "acos": "acos",
        "atan": "atan",
        "sinh": "sinh",
        "cosh": "cosh",
        "asinh": "asinh",
        "acosh": "acosh",
        "atanh": "atanh",
        "floor": "floor",
        "ceil": "ceil",
        "round": "round",
        "trunc": "trunc",
        "sign": "sign",
        "isnan": "isnan",
        "isinf": "isinf",
        "logical_not": "logical_not",
        "bitwise_not": "bitwise_invert",
    }
    table: dict = {}
    for op, name in xp_unary.items():
        table[getattr(aten, op).default] = R(_xp(name), f"xp.{name}")
    for op in ("relu", "sigmoid", "tanh", "silu"):
        table[getattr(aten, op).default] = R(_be(op), f"be.{op}")
    table.update(
        {
            aten.rsqrt.default: R(lambda rt, info, x: 1.0 / rt.be.xp.sqrt(x), "1 / xp.sqrt"),
            aten.reciprocal.default: R(lambda rt, info, x: 1.0 / x, "1 / x"),
            aten.square.default: R(_xp("square"), "xp.square"),
            aten.gelu.default: R(
                lambda rt, info, x, approximate="none": rt.be.gelu(x, approximate=approximate == "tanh"),
                "be.gelu",
            ),
            aten.leaky_relu.default: R(
                lambda rt, info, x, negative_slope=0.01: rt.be.leaky_relu(x, negative_slope), "be.leaky_relu"
            ),
            aten.elu.default: R(
                lambda rt, info, x, alpha=1.0, scale=1.0, input_scale=1.0: (
                    scale * rt.be.elu(x * input_scale if input_scale != 1 else x, alpha)
                ),
                "be.elu",
            ),
            aten.softplus.default: R(
                lambda rt, info, x, beta=1.0, threshold=20.0: rt.be.softplus(x, beta, threshold),
                "be.softplus",
            ),
            aten.hardtanh.default: R(
                lambda rt, info, x, min_val=-1.0, max_val=1.0: _where_clamp(rt.be.xp, x, min_val, max_val),
                "xp.where (torch's clamp gradient)",
            ),
            aten.clamp.default: R(
                lambda rt, info, x, min=None, max=None: _where_clamp(rt.be.xp, x, min, max),
                "xp.where (torch's clamp gradient)",
            ),
            aten.clamp.Tensor: R(
                lambda rt, info, x, min=None, max=None: _where_clamp(rt.be.xp, x, min, max),
                "xp.where (torch's clamp gradient)",
            ),
            # arithmetic
            aten.add.Tensor: R(_binary(operator.add, alpha=True), "a + alpha * b"),
            aten.add.Scalar: R(_binary(operator.add, alpha=True), "a + alpha * b"),
            aten.sub.Tensor: R(_binary(operator.sub, alpha=True), "a - alpha * b"),
            aten.sub.Scalar: R(_binary(operator.sub, alpha=True), "a - alpha * b"),
            aten.rsub.Scalar: R(lambda rt, info, a, b, alpha=1: b - alpha * a, "b - alpha * a"),
            aten.mul.Tensor: R(_binary(operator.mul), "a * b"),
            aten.mul.Scalar: R(_binary(operator.mul), "a * b"),
            aten.div.Tensor: R(_binary(operator.truediv), "a / b"),
            aten.div.Scalar: R(_binary(operator.truediv), "a / b"),
            aten.div.Tensor_mode: R(_div_mode, "a / b, xp.floor / xp.trunc"),
            aten.pow.Tensor_Scalar: R(_binary(operator.pow), "a ** b"),
            aten.pow.Tensor_Tensor: R(_binary(operator.pow), "a ** b"),
            aten.pow.Scalar: R(_binary(operator.pow), "a ** b"),
            aten.remainder.Tensor: R(_cmp("remainder"), "xp.remainder"),
            aten.remainder.Scalar: R(_cmp("remainder"), "xp.remainder"),
            aten.fmod.Tensor: R(_fmod, "xp.remainder, with the sign of a"),
            aten.fmod.Scalar: R(_fmod, "xp.remainder, with the sign of a"),
            aten.atan2.default: R(_cmp("atan2"), "xp.atan2"),
            aten.maximum.default: R(_cmp("maximum"), "xp.maximum"),
            aten.minimum.default: R(_cmp("minimum"), "xp.minimum"),
            aten.where.self: R(lambda rt, info, c, a, b: rt.be.xp.where(c, a, b), "xp.where"),
            aten.mm.default: R(lambda rt, info, a, b: rt.be.xp.matmul(a, b), "xp.matmul"),
            aten.bmm.default: R(lambda rt, info, a, b: rt.be.xp.matmul(a, b), "xp.matmul"),
            aten.addmm.default: R(_addmm, "beta * bias + alpha * xp.matmul(a, b)"),
        }
    )
    for op, name in (
        ("eq", "equal"),
        ("ne", "not_equal"),
        ("lt", "less"),
        ("le", "less_equal"),
        ("gt", "greater"),
        ("ge", "greater_equal"),
    ):
        for overload in ("Tensor", "Scalar"):
            table[getattr(getattr(aten, op), overload)] = R(_cmp(name), f"xp.{name}")
    for op in ("logical_and", "logical_or", "logical_xor"):
        table[getattr(aten, op).default] = R(_cmp(op), f"xp.{op}")
    for op, name in (
        ("bitwise_and", "bitwise_and"),
        ("bitwise_or", "bitwise_or"),
        ("bitwise_xor", "bitwise_xor"),
    ):
        table[getattr(aten, op).Tensor] = R(_cmp(name), f"xp.{name}")
    # reductions
    table.update(
        {
            aten.sum.dim_IntList: R(_reduce("sum"), "xp.sum"),
            aten.sum.default: R(
                lambda rt, info, x, dtype=None: _reduce("sum")(rt, info, x, None, False, dtype), "xp.sum"
            ),
            aten.mean.dim: R(_reduce("mean"), "xp.mean"),
            aten.mean.default: R(
                lambda rt, info, x, dtype=None: _reduce("mean")(rt, info, x, None, False, dtype), "xp.mean"
            ),
            aten.prod.dim_int: R(_reduce("prod"), "xp.prod"),
            aten.prod.default: R(
                lambda rt, info, x, dtype=None: _reduce("prod")(rt, info, x, None, False, dtype), "xp.prod"
            ),
            aten.amax.default: R(_reduce("max"), "xp.max"),
            aten.amin.default: R(_reduce("min"), "xp.min"),
            aten.max.default: R(lambda rt, info, x: rt.be.xp.max(x), "xp.max"),
            aten.min.default: R(lambda rt, info, x: rt.be.xp.min(x), "xp.min"),
            aten.max.dim: R(_max_dim("max", "argmax"), "xp.max, xp.argmax"),
            aten.min.dim: R(_max_dim("min", "argmin"), "xp.min, xp.argmin"),
            aten.argmax.default: R(_arg("argmax"), "xp.argmax"),
            aten.argmin.default: R(_arg("argmin"), "xp.argmin"),
            aten.any.dim: R(_reduce("any"), "xp.any"),
            aten.any.dims: R(_reduce("any"), "xp.any"),
            aten.any.default: R(lambda rt, info, x: rt.be.xp.any(x), "xp.any"),
            aten.all.dim: R(_reduce("all"), "xp.all"),
            aten.all.default: R(lambda rt, info, x: rt.be.xp.all(x), "xp.all"),
            aten.var.correction: R(
                lambda rt, info, x, dim=None, correction=None, keepdim=False: _var(
                    rt.be.xp, x, dim, correction, keepdim
                ),
                "xp.var",
            ),
            aten.var.dim: R(
                lambda rt, info, x, dim=None, unbiased=True, keepdim=False: _var(
                    rt.be.xp, x, dim, int(unbiased), keepdim
                ),
                "xp.var",
            ),
            aten.linalg_vector_norm.default: R(
                lambda rt, info, x, ord=2, dim=None, keepdim=False, dtype=None: _norm(
                    rt.be.xp, x, ord, dim, keepdim, dtype
                ),
                "xp.sqrt(xp.sum(xp.square)) (and the other orders)",
            ),
            aten.cumsum.default: R(_cumsum, "xp.cumulative_sum"),
        }
    )
    # shapes, indexing, copies
    table.update(
        {
            aten.view.default: R(lambda rt, info, x, size: rt.be.xp.reshape(x, tuple(size)), "xp.reshape"),
            aten._unsafe_view.default: R(
                lambda rt, info, x, size: rt.be.xp.reshape(x, tuple(size)), "xp.reshape"
            ),
            aten.reshape.default: R(
                lambda rt, info, x, shape: rt.be.xp.reshape(x, tuple(shape)), "xp.reshape"
            ),
            aten.permute.default: R(
                lambda rt, info, x, dims: rt.be.xp.permute_dims(x, tuple(d % x.ndim for d in dims)),
                "xp.permute_dims",
            ),
            aten.t.default: R(
                lambda rt, info, x: rt.be.xp.permute_dims(x, tuple(reversed(range(x.ndim)))),
                "xp.permute_dims",
            ),
            aten.transpose.int: R(_transpose, "xp.permute_dims"),
            aten.expand.default: R(
                lambda rt, info, x, size, implicit=False: _expand(rt.be.xp, x, size), "xp.broadcast_to"
            ),
            aten.unsqueeze.default: R(
                lambda rt, info, x, dim: rt.be.xp.expand_dims(x, axis=dim % (x.ndim + 1)), "xp.expand_dims"
            ),
            aten.squeeze.dims: R(lambda rt, info, x, dim: _squeeze(rt.be.xp, x, dim), "xp.squeeze"),
            aten.squeeze.dim: R(lambda rt, info, x, dim: _squeeze(rt.be.xp, x, (dim,)), "xp.squeeze"),
            aten.squeeze.default: R(lambda rt, info, x: _squeeze(rt.be.xp, x, range(x.ndim)), "xp.squeeze"),
            aten.select.int: R(lambda rt, info, x, dim, index: _select(x, dim, index), "x[..., i]"),
            aten.slice.Tensor: R(
                lambda rt, info, x, dim=0, start=None, end=None, step=1: _slice(x, dim, start, end, step),
                "x[..., start:end:step]",
            ),
            aten.split_with_sizes.default: R(
                lambda rt, info, x, split_sizes, dim=0: _split_sizes(x, split_sizes, dim), "slices"
            ),
            aten.split.Tensor: R(
                lambda rt, info, x, split_size, dim=0: _split(x, int(split_size), dim), "slices"
            ),
            aten.unbind.int: R(lambda rt, info, x, dim=0: list(rt.be.xp.unstack(x, axis=dim)), "xp.unstack"),
            aten.cat.default: R(
                lambda rt, info, tensors, dim=0: rt.be.xp.concat(list(tensors), axis=dim), "xp.concat"
            ),
            aten.stack.default: R(_stack, "xp.stack"),
            aten.flip.default: R(lambda rt, info, x, dims: rt.be.xp.flip(x, axis=tuple(dims)), "xp.flip"),
            aten.roll.default: R(
                lambda rt, info, x, shifts, dims=(): rt.be.xp.roll(
                    x, tuple(shifts), axis=tuple(dims) or None
                ),
                "xp.roll",
            ),
            aten.repeat.default: R(lambda rt, info, x, repeats: rt.be.xp.tile(x, tuple(repeats)), "xp.tile"),
            aten.index.Tensor: R(_index, "x[indices] (advanced indexing)"),
            aten.index_select.default: R(_embedding_like_take, "xp.take"),
            aten.gather.default: R(
                lambda rt, info, x, dim, index, sparse_grad=False: rt.be.xp.take_along_axis(
                    x, index, axis=dim % x.ndim
                ),
                "xp.take_along_axis",
            ),
            aten.constant_pad_nd.default: R(
                lambda rt, info, x, pad, value=0: _pad(rt, x, pad, value), "xp.concat of xp.full"
            ),
            aten.clone.default: R(_identity, "x (arrays are values)"),
            aten.alias.default: R(_identity, "x"),
            aten.lift_fresh_copy.default: R(_identity, "x"),
            aten._to_copy.default: R(_to_copy, "xp.astype"),
            aten._assert_tensor_metadata.default: R(_noop, "nothing (a trace-time assertion)"),
            operator.getitem: R(_getitem, "an element of a multi-output operator's result"),
        }
    )
    return table


def _transpose(rt, info, x, dim0, dim1):
    axes = list(range(x.ndim))
    a, b = dim0 % x.ndim, dim1 % x.ndim
    axes[a], axes[b] = axes[b], axes[a]
    return rt.be.xp.permute_dims(x, tuple(axes))
