"""Elementwise operators: unary math and activations, arithmetic, comparisons, logical and
bitwise operators, ``where``, clamps, and the matrix products.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..helpers import as_result_dtype
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("elementwise", AtenRule)
register = RULES.register

_XP_UNARY = {
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
    "square": "square",
}


# Every rule computes in the node's result dtype (torch's type promotion: an integer tensor
# times a Python float is float32, not float64): ``as_result_dtype`` casts the operands first.


def _xp(name):
    return lambda rt, info, x: getattr(rt.be.xp, name)(as_result_dtype(rt, info, x))


def _be(name):
    return lambda rt, info, x: getattr(rt.be, name)(as_result_dtype(rt, info, x))


def _xp2(name):
    return lambda rt, info, a, b: getattr(rt.be.xp, name)(*as_result_dtype(rt, info, a, b))


for _op, _name in _XP_UNARY.items():
    RULES.add(getattr(aten, _op).default, _xp(_name), doc=f"xp.{_name}")
for _op in ("relu", "sigmoid", "tanh", "silu"):
    RULES.add(getattr(aten, _op).default, _be(_op), doc=f"be.{_op}")
for _op, _name in (
    ("eq", "equal"),
    ("ne", "not_equal"),
    ("lt", "less"),
    ("le", "less_equal"),
    ("gt", "greater"),
    ("ge", "greater_equal"),
):
    for _overload in ("Tensor", "Scalar"):
        RULES.add(getattr(getattr(aten, _op), _overload), _xp2(_name), doc=f"xp.{_name}")
for _op in ("logical_and", "logical_or", "logical_xor"):
    RULES.add(getattr(aten, _op).default, _xp2(_op), doc=f"xp.{_op}")
for _op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
    for _overload in ("Tensor", "Scalar"):
        RULES.add(getattr(getattr(aten, _op), _overload), _xp2(_op), doc=f"xp.{_op}")
for _op, _name in (
    ("remainder.Tensor", "remainder"),
    ("remainder.Scalar", "remainder"),
    ("atan2.default", "atan2"),
    ("maximum.default", "maximum"),
    ("minimum.default", "minimum"),
):
    _packet, _overload = _op.split(".")
    RULES.add(getattr(getattr(aten, _packet), _overload), _xp2(_name), doc=f"xp.{_name}")


# ============================================================================ activations


@register(aten.rsqrt.default, doc="1 / xp.sqrt")
def _rsqrt(rt, info, x):
    x = as_result_dtype(rt, info, x)
    return 1.0 / rt.be.xp.sqrt(x)


@register(aten.reciprocal.default, doc="1 / x")
def _reciprocal(rt, info, x):
    x = as_result_dtype(rt, info, x)
    return 1.0 / x


@register(aten.exp2.default, doc="xp.exp(x * log 2)")
def _exp2(rt, info, x):
    x = as_result_dtype(rt, info, x)
    return rt.be.xp.exp(x * float(np.log(2.0)))


@register(aten.gelu.default, doc="be.gelu")
def _gelu(rt, info, x, approximate="none"):
    return rt.be.gelu(x, approximate=approximate == "tanh")


@register(aten.leaky_relu.default, doc="be.leaky_relu")
def _leaky_relu(rt, info, x, negative_slope=0.01):
    return rt.be.leaky_relu(x, negative_slope)


@register(aten.elu.default, doc="be.elu")
def _elu(rt, info, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return scale * rt.be.elu(x * input_scale if input_scale != 1 else x, alpha)


@register(aten.softplus.default, doc="be.softplus")
def _softplus(rt, info, x, beta=1.0, threshold=20.0):
    return rt.be.softplus(x, beta, threshold)


def _where_clamp(xp, x, lo, hi):
    # torch's clamp passes the gradient at the bounds (inclusive); minimum/maximum split it
    if lo is not None:
        x = xp.where(x < lo, xp.asarray(lo, dtype=x.dtype) if not hasattr(lo, "shape") else lo, x)
    if hi is not None:
        x = xp.where(x > hi, xp.asarray(hi, dtype=x.dtype) if not hasattr(hi, "shape") else hi, x)
    return x


@register(aten.hardtanh.default, doc="xp.where (torch's clamp gradient)")
def _hardtanh(rt, info, x, min_val=-1.0, max_val=1.0):
    return _where_clamp(rt.be.xp, as_result_dtype(rt, info, x), min_val, max_val)


@register(aten.clamp.default, aten.clamp.Tensor, doc="xp.where (torch's clamp gradient)")
def _clamp(rt, info, x, min=None, max=None):
    x, min, max = as_result_dtype(rt, info, x, min, max)
    return _where_clamp(rt.be.xp, x, min, max)


# ============================================================================ arithmetic


def _binary(op):
    def fn(rt, info, a, b, alpha=1):
        a, b = as_result_dtype(rt, info, a, b)
        return op(a, b if alpha == 1 else b * alpha)

    return fn


RULES.add(aten.add.Tensor, _binary(operator.add), doc="a + alpha * b")
RULES.add(aten.add.Scalar, _binary(operator.add), doc="a + alpha * b")
RULES.add(aten.sub.Tensor, _binary(operator.sub), doc="a - alpha * b")
RULES.add(aten.sub.Scalar, _binary(operator.sub), doc="a - alpha * b")


@register(aten.rsub.Scalar, doc="b - alpha * a")
def _rsub(rt, info, a, b, alpha=1):
    a, b = as_result_dtype(rt, info, a, b)
    return b - alpha * a


@register(aten.mul.Tensor, aten.mul.Scalar, doc="a * b")
def _mul(rt, info, a, b):
    a, b = as_result_dtype(rt, info, a, b)
    return a * b


@register(aten.div.Tensor, aten.div.Scalar, doc="a / b")
def _div(rt, info, a, b):
    a, b = as_result_dtype(rt, info, a, b)
    return a / b


@register(aten.div.Tensor_mode, aten.div.Scalar_mode, doc="a / b, xp.floor / xp.trunc")
def _div_mode(rt, info, a, b, rounding_mode=None):
    xp = rt.be.xp
    a, b = as_result_dtype(rt, info, a, b)
    q = a / b
    exact = _is_int(a, b)
    if rounding_mode == "floor":
        return xp.floor(q) if not exact else xp.floor_divide(a, b)
    if rounding_mode == "trunc":
        t = xp.trunc(q)
        return xp.astype(t, a.dtype) if exact else t
    return q


def _is_int(*values) -> bool:
    return all(not hasattr(v, "dtype") or "int" in str(v.dtype) for v in values)


@register(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar, doc="a ** b")
def _pow(rt, info, a, b):
    a, b = as_result_dtype(rt, info, a, b)
    return a**b


@register(aten.fmod.Tensor, aten.fmod.Scalar, doc="xp.remainder, with the sign of a")
def _fmod(rt, info, a, b):
    # C's fmod (the sign of a) from the array API's remainder (the sign of b); exact for ints
    xp = rt.be.xp
    a, b = as_result_dtype(rt, info, a, b)
    r = xp.remainder(a, b)
    return xp.where((r != 0) & ((r < 0) != (a < 0)), r - b, r)


@register(aten.where.self, doc="xp.where", bounded=True)
def _where(rt, info, c, a, b):
    return rt.be.xp.where(c, *as_result_dtype(rt, info, a, b))


@register(aten.mm.default, aten.bmm.default, doc="xp.matmul")
def _matmul(rt, info, a, b):
    return rt.be.xp.matmul(a, b)


@register(aten.addmm.default, doc="beta * bias + alpha * xp.matmul(a, b)")
def _addmm(rt, info, bias, a, b, beta=1, alpha=1):
    prod = rt.be.xp.matmul(a, b)
    return (bias if beta == 1 else beta * bias) + (prod if alpha == 1 else alpha * prod)
