"""Reductions: sums, means, products, extrema and their indices, ``any``/``all``, variance,
vector norms, cumulative sums.
"""

from __future__ import annotations

import math

import torch

from ..helpers import Unsupported, axis_of, dtype_of
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("reductions", AtenRule)
register = RULES.register


def _reduce(name):
    def fn(rt, info, x, dim=None, keepdim=False, dtype=None):
        out = getattr(rt.be.xp, name)(x, axis=axis_of(dim, x.ndim), keepdims=keepdim)
        return out if dtype is None else rt.be.xp.astype(out, dtype_of(rt.be, dtype))

    return fn


def _reduce_all(name):
    def fn(rt, info, x, dtype=None):
        return _reduce(name)(rt, info, x, None, False, dtype)

    return fn


def _whole(name):
    return lambda rt, info, x: getattr(rt.be.xp, name)(x)


for _op, _name in (("sum", "sum"), ("mean", "mean"), ("prod", "prod")):
    RULES.add(getattr(aten, _op).default, _reduce_all(_name), doc=f"xp.{_name}")
for _op, _name in (
    (aten.sum.dim_IntList, "sum"),
    (aten.mean.dim, "mean"),
    (aten.prod.dim_int, "prod"),
):
    RULES.add(_op, _reduce(_name), doc=f"xp.{_name}")
for _op, _name in (
    (aten.amax.default, "max"),
    (aten.amin.default, "min"),
    (aten.any.dim, "any"),
    (aten.any.dims, "any"),
    (aten.all.dim, "all"),
):
    RULES.add(_op, _reduce(_name), doc=f"xp.{_name}", bounded=True)
for _op, _name in (
    (aten.max.default, "max"),
    (aten.min.default, "min"),
    (aten.any.default, "any"),
    (aten.all.default, "all"),
):
    RULES.add(_op, _whole(_name), doc=f"xp.{_name}", bounded=True)


def _max_dim(reducer, arg):
    def fn(rt, info, x, dim, keepdim=False):
        xp = rt.be.xp
        return getattr(xp, reducer)(x, axis=dim, keepdims=keepdim), getattr(xp, arg)(
            x, axis=dim, keepdims=keepdim
        )

    return fn


RULES.add(aten.max.dim, _max_dim("max", "argmax"), doc="xp.max, xp.argmax", bounded=True)
RULES.add(aten.min.dim, _max_dim("min", "argmin"), doc="xp.min, xp.argmin", bounded=True)


def _arg(name):
    def fn(rt, info, x, dim=None, keepdim=False):
        xp = rt.be.xp
        if dim is None:
            out = getattr(xp, name)(xp.reshape(x, (-1,)), axis=0)
            return xp.reshape(out, (1,) * x.ndim) if keepdim else out
        return getattr(xp, name)(x, axis=dim, keepdims=keepdim)

    return fn


RULES.add(aten.argmax.default, _arg("argmax"), doc="xp.argmax", bounded=True)
RULES.add(aten.argmin.default, _arg("argmin"), doc="xp.argmin", bounded=True)


def _var(xp, x, dim=None, correction=None, keepdim=False):
    axis = axis_of(dim, x.ndim)
    return xp.var(x, axis=axis, correction=1 if correction is None else correction, keepdims=keepdim)


@register(aten.var.correction, doc="xp.var")
def _var_correction(rt, info, x, dim=None, correction=None, keepdim=False):
    return _var(rt.be.xp, x, dim, correction, keepdim)


@register(aten.var.dim, doc="xp.var")
def _var_dim(rt, info, x, dim=None, unbiased=True, keepdim=False):
    return _var(rt.be.xp, x, dim, int(unbiased), keepdim)


def _root(xp, s, p):
    """``s ** (1 / p)`` (``sqrt`` for p = 2), 0 where ``s`` is 0 with a zero derivative there:
    torch's norm has a zero gradient at a zero vector, where the root's derivative is infinite
    (its JVP would be 0 * inf = NaN).
    """
    zero = s == 0
    safe = xp.where(zero, xp.ones_like(s), s)
    root = xp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
    return xp.where(zero, xp.zeros_like(s), root)


@register(
    aten.linalg_vector_norm.default,
    doc="xp.sqrt(xp.sum(xp.square)) (and the other orders; a zero derivative at zero, as in torch)",
)
def _vector_norm(rt, info, x, ord=2, dim=None, keepdim=False, dtype=None):
    xp = rt.be.xp
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
        return _root(xp, xp.sum(xp.square(x), axis=axis, keepdims=keepdim), 2)
    return _root(xp, xp.sum(a**ord, axis=axis, keepdims=keepdim), ord)


@register(aten.cumsum.default, doc="xp.cumulative_sum")
def _cumsum(rt, info, x, dim, dtype=None):
    out = rt.be.xp.cumulative_sum(x, axis=dim % x.ndim)
    return out if dtype is None else rt.be.xp.astype(out, dtype_of(rt.be, dtype))
