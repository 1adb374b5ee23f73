"""The rules that lower ``torch.fx`` call targets onto duogard's backend ops (used by
:mod:`.lower`, the fallback where ``torch.export`` cannot capture a forward).

Three tables map what an fx graph calls to functions written against the backend contract
(``be.xp``, ``be.conv2d``, ``be.max_pool2d`` ...):

- :func:`function_rules`: ``torch.*``, ``torch.nn.functional.*`` and Python operators, each
  registered by decorator on :data:`FUNCTIONS`;
- :func:`method_rules`: tensor methods (``x.view``, ``x.sum`` ...), on :data:`METHODS`;
- leaf ``torch.nn`` modules (``nn.Linear``, ``nn.Conv2d`` ...) have theirs in :mod:`.fx_modules`.

Each rule is ``fn(rt, index, <torch's parameter names and defaults>)``; an optional check (same
parameters, minus rt/index) runs at lowering time with fx Nodes for tensor arguments. A rule
that cannot lower its node raises :class:`~duogard_torch.port.helpers.Unsupported`.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .fx_shared import (
    avg_pool,
    axis_index,
    batch_norm,
    conv_padding,
    dropout,
    flatten,
    gelu,
    gelu_check,
    max_pool,
    no_dtype,
    pool_checks,
    shape_args,
    softmax_dim,
)
from .helpers import Unsupported, pair, static
from .registry import FxRule, RuleTable

__all__ = ["FUNCTIONS", "METHODS", "function_rules", "method_rules"]

FUNCTIONS = RuleTable("fx functions", FxRule)
METHODS = RuleTable("fx tensor methods", FxRule)
function = FUNCTIONS.register
method = METHODS.register


# ============================================================================ function rules


def _binary(op):
    return lambda rt, i, input, other, alpha=1: op(input, other if alpha == 1 else other * alpha)


def _unary(name):
    return lambda rt, i, input, inplace=False: getattr(rt.be, name)(input)


def _xp_unary(name):
    return lambda rt, i, input: getattr(rt.be.xp, name)(input)


def _softmax(name):
    def fn(rt, i, input, dim=None, _stacklevel=3, dtype=None):
        return getattr(rt.be, name)(input, axis=dim)

    def check(input, dim=None, _stacklevel=3, dtype=None):
        softmax_dim(dim)
        no_dtype(dtype)

    return fn, check


for _target, _op in (
    (operator.add, operator.add),
    (operator.sub, operator.sub),
    (operator.mul, operator.mul),
    (operator.truediv, operator.truediv),
    (torch.add, operator.add),
    (torch.sub, operator.sub),
):
    FUNCTIONS.add(_target, _binary(_op))
for _target, _name in (
    (torch.relu, "relu"),
    (torch.tanh, "tanh"),
    (torch.sigmoid, "sigmoid"),
    (F.relu, "relu"),
    (F.tanh, "tanh"),
    (F.sigmoid, "sigmoid"),
    (F.silu, "silu"),
):
    FUNCTIONS.add(_target, _unary(_name))
for _target, _name in (
    (torch.exp, "exp"),
    (torch.log, "log"),
    (torch.sqrt, "sqrt"),
    (torch.abs, "abs"),
    (torch.square, "square"),
):
    FUNCTIONS.add(_target, _xp_unary(_name))
for _target, _name in (
    (torch.softmax, "softmax"),
    (torch.log_softmax, "log_softmax"),
    (F.softmax, "softmax"),
    (F.log_softmax, "log_softmax"),
):
    _fn, _check = _softmax(_name)
    FUNCTIONS.add(_target, _fn, check=_check)


@function(operator.matmul)
def _op_matmul(rt, i, a, b):
    return a @ b


@function(operator.neg)
def _op_neg(rt, i, a):
    return -a


@function(operator.pos)
def _op_pos(rt, i, a):
    return a


@function(operator.pow)
def _op_pow(rt, i, a, b):
    return a**b


@function(operator.getitem)
def _op_getitem(rt, i, a, b):
    return a[b]


def _getattr_check(obj, name):
    if name not in ("shape", "ndim", "T"):
        raise Unsupported(f"tensor attribute .{name}")


@function(getattr, check=_getattr_check)
def _getattr(rt, i, obj, name):
    if name == "shape":
        return tuple(int(s) for s in obj.shape)
    if name == "ndim":
        return obj.ndim
    if name == "T":
        return rt.be.xp.permute_dims(obj, tuple(reversed(range(obj.ndim))))
    raise AssertionError(name)


@function(torch.mul)
def _mul(rt, i, input, other):
    return input * other


def _div_check(input, other, rounding_mode=None):
    if static(rounding_mode, "rounding_mode") is not None:
        raise Unsupported(f"div with rounding_mode={rounding_mode!r}")


@function(torch.div, check=_div_check)
def _div(rt, i, input, other, rounding_mode=None):
    return input / other


@function(torch.true_divide)
def _true_divide(rt, i, input, other):
    return input / other


@function(torch.matmul)
def _matmul(rt, i, input, other):
    return rt.be.xp.matmul(input, other)


@function(torch.mm)
def _mm(rt, i, input, mat2):
    return rt.be.xp.matmul(input, mat2)


@function(torch.neg)
def _neg(rt, i, input):
    return -input


@function(torch.flatten)
def _flatten_rule(rt, i, input, start_dim=0, end_dim=-1):
    return flatten(rt.be.xp, input, start_dim, end_dim)


@function(torch.reshape)
def _reshape(rt, i, input, shape):
    return rt.be.xp.reshape(input, shape_args((shape,)))


@function(torch.cat)
def _cat(rt, i, tensors, dim=0):
    return rt.be.xp.concat(list(tensors), axis=dim)


@function(torch.transpose)
def _transpose(rt, i, input, dim0, dim1):
    axes = list(range(input.ndim))
    a, b = axis_index(dim0, input.ndim), axis_index(dim1, input.ndim)
    axes[a], axes[b] = axes[b], axes[a]
    return rt.be.xp.permute_dims(input, tuple(axes))


@function(F.gelu, check=lambda input, approximate="none": gelu_check(approximate))
def _gelu_rule(rt, i, input, approximate="none"):
    return gelu(rt.be, input, approximate)


@function(F.leaky_relu)
def _leaky_relu(rt, i, input, negative_slope=0.01, inplace=False):
    return rt.be.leaky_relu(input, negative_slope)


@function(F.elu)
def _elu(rt, i, input, alpha=1.0, inplace=False):
    return rt.be.elu(input, alpha)


@function(F.softplus)
def _softplus(rt, i, input, beta=1.0, threshold=20.0):
    return rt.be.softplus(input, beta, threshold)


@function(F.linear)
def _linear(rt, i, input, weight, bias=None):
    return rt.be.linear(input, weight, bias)


def _conv2d_check(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups)):
        static(v, name)
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise Unsupported(f"padding={padding!r}")


@function(F.conv2d, check=_conv2d_check)
def _conv2d(rt, i, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    kernel = tuple(weight.shape[2:])
    return rt.be.conv2d(
        input,
        weight,
        bias,
        stride=pair(stride),
        padding=conv_padding(padding, kernel, dilation, stride),
        dilation=pair(dilation),
        groups=int(groups),
    )


def _max_pool2d_check(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    pool_checks("max_pool2d", dilation, ceil_mode, return_indices)


@function(F.max_pool2d, check=_max_pool2d_check)
def _max_pool2d(
    rt, i, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    return max_pool(rt.be, input, kernel_size, stride, padding)


def _avg_pool2d_check(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    pool_checks("avg_pool2d", 1, ceil_mode, False, divisor_override)


@function(F.avg_pool2d, check=_avg_pool2d_check)
def _avg_pool2d(
    rt,
    i,
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    return avg_pool(rt.be, input, kernel_size, stride, padding, count_include_pad)


@function(F.dropout)
def _dropout_rule(rt, i, input, p=0.5, training=True, inplace=False):
    return dropout(rt, i, input, float(p), "F.dropout") if training else input


@function(F.layer_norm)
def _layer_norm(rt, i, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return rt.be.layer_norm(input, weight, bias, normalized_ndim=len(shape), eps=float(eps))


def _batch_norm_check(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if static(training, "training") and running_mean is not None:
        raise Unsupported("batch_norm in training mode updates running statistics in place; use eval mode")


@function(F.batch_norm, check=_batch_norm_check)
def _batch_norm_rule(
    rt, i, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    return batch_norm(rt.be, input, running_mean, running_var, weight, bias, float(eps), training)


def function_rules() -> dict:
    """``torch.*``, ``F.*`` and Python operator targets to their :class:`FxRule`."""
    return dict(FUNCTIONS.items())


# ============================================================================ method rules


@method("view", "reshape")
def _view(rt, i, self, *shape):
    return rt.be.xp.reshape(self, shape_args(shape))


@method("permute")
def _permute(rt, i, self, *dims):
    return rt.be.xp.permute_dims(self, shape_args(dims))


@method("size")
def _size(rt, i, self, dim=None):
    shape = tuple(int(s) for s in self.shape)
    return shape if dim is None else shape[dim]


@method("dim")
def _ndim(rt, i, self):
    return self.ndim


@method("contiguous")
def _contiguous(rt, i, self, memory_format=None):
    return self


@method("t")
def _t(rt, i, self):
    return rt.be.xp.matrix_transpose(self)


def _reduce(name):
    def fn(rt, i, self, dim=None, keepdim=False, dtype=None):
        axis = tuple(dim) if isinstance(dim, (list, tuple)) else dim
        return getattr(rt.be.xp, name)(self, axis=axis, keepdims=keepdim)

    def check(self, dim=None, keepdim=False, dtype=None):
        no_dtype(dtype)

    return fn, check


for _name in ("sum", "mean"):
    _fn, _check = _reduce(_name)
    METHODS.add(_name, _fn, check=_check)


@method("unsqueeze")
def _unsqueeze(rt, i, self, dim):
    return rt.be.xp.expand_dims(self, axis=axis_index(dim, self.ndim + 1))


@method("squeeze")
def _squeeze(rt, i, self, dim=None):
    if dim is None:
        dims = tuple(d for d, s in enumerate(self.shape) if s == 1)
    else:
        dims = tuple(
            axis_index(d, self.ndim) for d in ((dim,) if isinstance(dim, int) else dim) if self.shape[d] == 1
        )
    return rt.be.xp.squeeze(self, axis=dims) if dims else self


@method("pow")
def _pow_method(rt, i, self, exponent):
    return self**exponent


# a method that is its function with self first: the function's rule
for _name, _target in (
    ("add", torch.add),
    ("sub", torch.sub),
    ("mul", torch.mul),
    ("div", torch.div),
    ("matmul", torch.matmul),
    ("neg", torch.neg),
    ("relu", torch.relu),
    ("tanh", torch.tanh),
    ("sigmoid", torch.sigmoid),
    ("exp", torch.exp),
    ("log", torch.log),
    ("sqrt", torch.sqrt),
    ("abs", torch.abs),
    ("flatten", torch.flatten),
    ("transpose", torch.transpose),
    ("softmax", torch.softmax),
    ("log_softmax", torch.log_softmax),
):
    METHODS.alias(_name, FUNCTIONS[_target])


def method_rules() -> dict:
    """Tensor method names to their :class:`FxRule`."""
    return dict(METHODS.items())
