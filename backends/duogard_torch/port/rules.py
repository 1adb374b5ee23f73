"""The rules that lower torch ops onto duogard's backend ops (used by :mod:`.lower`).

Three tables map what a ``torch.fx`` graph calls to functions written against the backend
contract (``be.xp``, ``be.conv2d``, ``be.max_pool2d`` ...):

- :func:`function_rules`: ``torch.*``, ``torch.nn.functional.*`` and Python operators;
- :func:`method_rules`: tensor methods (``x.view``, ``x.sum`` ...);
- :func:`module_rule`: leaf ``torch.nn`` modules (``nn.Linear``, ``nn.Conv2d`` ...).

A rule that cannot lower its node raises :class:`Unsupported` with the reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["Rule", "Unsupported", "function_rules", "method_rules", "module_rule"]


from .helpers import (
    Unsupported,
    _avg_pool,
    _batch_norm,
    _conv_padding,
    _dim,
    _dropout,
    _flatten,
    _gelu,
    _max_pool,
    _no_dtype,
    _pair,
    _pool_checks,
    _shape_args,
    _softmax_dim,
    _static,
)

# ============================================================================ function rules
# Each rule is fn(rt, index, <torch's parameter names and defaults>); an optional check
# (same parameters, minus rt/index) runs at lowering time with fx Nodes for tensor arguments.


@dataclass(frozen=True)
class Rule:
    """A lowering rule: ``fn`` builds the node's computation; ``check``, if given, may refuse it."""

    fn: Callable
    check: Callable | None = None


def function_rules() -> dict[Any, Rule]:
    R = Rule

    def binary(op):
        return R(lambda rt, i, input, other, alpha=1: op(input, other if alpha == 1 else other * alpha))

    def unary(name):
        return R(lambda rt, i, input, inplace=False: getattr(rt.be, name)(input))

    def xp_unary(name):
        return R(lambda rt, i, input: getattr(rt.be.xp, name)(input))

    def softmax(name):
        def fn(rt, i, input, dim=None, _stacklevel=3, dtype=None):
            return getattr(rt.be, name)(input, axis=dim)

        def check(input, dim=None, _stacklevel=3, dtype=None):
            _softmax_dim(dim)
            _no_dtype(dtype)

        return R(fn, check)

    def linear(rt, i, input, weight, bias=None):
        return rt.be.linear(input, weight, bias)

    def conv2d(rt, i, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        kernel = tuple(weight.shape[2:])
        return rt.be.conv2d(
            input,
            weight,
            bias,
            stride=_pair(stride),
            padding=_conv_padding(padding, kernel, dilation, stride),
            dilation=_pair(dilation),
            groups=int(groups),
        )

    def conv2d_check(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups)):
            _static(v, name)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise Unsupported(f"padding={padding!r}")

    def max_pool2d(
        rt, i, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        return _max_pool(rt.be, input, kernel_size, stride, padding)

    def max_pool2d_check(
        input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        _pool_checks("max_pool2d", dilation, ceil_mode, return_indices)

    def avg_pool2d(
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
        return _avg_pool(rt.be, input, kernel_size, stride, padding, count_include_pad)

    def avg_pool2d_check(
        input,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        _pool_checks("avg_pool2d", 1, ceil_mode, False, divisor_override)

    def dropout(rt, i, input, p=0.5, training=True, inplace=False):
        return _dropout(rt, i, input, float(p), "F.dropout") if training else input

    def layer_norm(rt, i, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        return rt.be.layer_norm(input, weight, bias, normalized_ndim=len(shape), eps=float(eps))

    def batch_norm(
        rt,
        i,
        input,
        running_mean,
        running_var,
        weight=None,
        bias=None,
        training=False,
        momentum=0.1,
        eps=1e-5,
    ):
        return _batch_norm(rt.be, input, running_mean, running_var, weight, bias, float(eps), training)

    def batch_norm_check(
        input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
    ):
        if _static(training, "training") and running_mean is not None:
            raise Unsupported(
                "batch_norm in training mode updates running statistics in place; use eval mode"
            )

    def flatten(rt, i, input, start_dim=0, end_dim=-1):
        return _flatten(rt.be.xp, input, start_dim, end_dim)

    def reshape(rt, i, input, shape):
        return rt.be.xp.reshape(input, _shape_args((shape,)))

    def cat(rt, i, tensors, dim=0):
        return rt.be.xp.concat(list(tensors), axis=dim)

    def transpose(rt, i, input, dim0, dim1):
        axes = list(range(input.ndim))
        a, b = _dim(dim0, input.ndim), _dim(dim1, input.ndim)
        axes[a], axes[b] = axes[b], axes[a]
        return rt.be.xp.permute_dims(input, tuple(axes))

    def div(rt, i, input, other, rounding_mode=None):
        return input / other

    def div_check(input, other, rounding_mode=None):
        if _static(rounding_mode, "rounding_mode") is not None:
            raise Unsupported(f"div with rounding_mode={rounding_mode!r}")

    def getattr_(rt, i, obj, name):
        if name == "shape":
            return tuple(int(s) for s in obj.shape)
        if name == "ndim":
            return obj.ndim
        if name == "T":
            return rt.be.xp.permute_dims(obj, tuple(reversed(range(obj.ndim))))
        raise AssertionError(name)

    def getattr_check(obj, name):
        if name not in ("shape", "ndim", "T"):
            raise Unsupported(f"tensor attribute .{name}")

    def leaky_relu(rt, i, input, negative_slope=0.01, inplace=False):
        return rt.be.leaky_relu(input, negative_slope)

    def elu(rt, i, input, alpha=1.0, inplace=False):
        return rt.be.elu(input, alpha)

    def softplus(rt, i, input, beta=1.0, threshold=20.0):
        return rt.be.softplus(input, beta, threshold)

    table = {
        operator.add: binary(operator.add),
        operator.sub: binary(operator.sub),
        operator.mul: binary(operator.mul),
        operator.truediv: binary(operator.truediv),
        operator.matmul: R(lambda rt, i, a, b: a @ b),
        operator.neg: R(lambda rt, i, a: -a),
        operator.pos: R(lambda rt, i, a: a),
        operator.pow: R(lambda rt, i, a, b: a**b),
        operator.getitem: R(lambda rt, i, a, b: a[b]),
        getattr: R(getattr_, getattr_check),
        torch.add: binary(operator.add),
        torch.sub: binary(operator.sub),
        torch.mul: R(lambda rt, i, input, other: input * other),
        torch.div: R(div, div_check),
        torch.true_divide: R(lambda rt, i, input, other: input / other),
        torch.matmul: R(lambda rt, i, input, other: rt.be.xp.matmul(input, other)),
        torch.mm: R(lambda rt, i, input, mat2: rt.be.xp.matmul(input, mat2)),
        torch.neg: R(lambda rt, i, input: -input),
        torch.relu: unary("relu"),
        torch.tanh: unary("tanh"),
        torch.sigmoid: unary("sigmoid"),
        torch.exp: xp_unary("exp"),
        torch.log: xp_unary("log"),
        torch.sqrt: xp_unary("sqrt"),
        torch.abs: xp_unary("abs"),
        torch.square: xp_unary("square"),
        torch.flatten: R(flatten),
        torch.reshape: R(reshape),
        torch.cat: R(cat),
        torch.transpose: R(transpose),
        torch.softmax: softmax("softmax"),
        torch.log_softmax: softmax("log_softmax"),
        F.relu: unary("relu"),
        F.tanh: unary("tanh"),
        F.sigmoid: unary("sigmoid"),
        F.silu: unary("silu"),
        F.gelu: R(
            lambda rt, i, input, approximate="none": _gelu(rt.be, input, approximate),
            lambda input, approximate="none": _gelu_check(approximate),
        ),
        F.leaky_relu: R(leaky_relu),
        F.elu: R(elu),
        F.softplus: R(softplus),
        F.softmax: softmax("softmax"),
        F.log_softmax: softmax("log_softmax"),
        F.linear: R(linear),
        F.conv2d: R(conv2d, conv2d_check),
        F.max_pool2d: R(max_pool2d, max_pool2d_check),
        F.avg_pool2d: R(avg_pool2d, avg_pool2d_check),
        F.dropout: R(dropout),
        F.layer_norm: R(layer_norm),
        F.batch_norm: R(batch_norm, batch_norm_check),
    }
    return table


def _gelu_check(approximate):
    if _static(approximate, "approximate") not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={approximate!r}")


# method name -> function rule it is equivalent to (self is the first argument), or own rule
def method_rules(fn_rules) -> dict[str, Rule]:
    R = Rule

    def view(rt, i, self, *shape):
        return rt.be.xp.reshape(self, _shape_args(shape))

    def size(rt, i, self, dim=None):
        shape = tuple(int(s) for s in self.shape)
        return shape if dim is None else shape[dim]

    def permute(rt, i, self, *dims):
        return rt.be.xp.permute_dims(self, _shape_args(dims))

    def reduce(name):
        def fn(rt, i, self, dim=None, keepdim=False, dtype=None):
            axis = tuple(dim) if isinstance(dim, (list, tuple)) else dim
            return getattr(rt.be.xp, name)(self, axis=axis, keepdims=keepdim)

        def check(self, dim=None, keepdim=False, dtype=None):
            _no_dtype(dtype)

        return R(fn, check)

    def unsqueeze(rt, i, self, dim):
        return rt.be.xp.expand_dims(self, axis=_dim(dim, self.ndim + 1))

    def squeeze(rt, i, self, dim=None):
        if dim is None:
            dims = tuple(d for d, s in enumerate(self.shape) if s == 1)
        else:
            dims = tuple(
                _dim(d, self.ndim) for d in ((dim,) if isinstance(dim, int) else dim) if self.shape[d] == 1
            )
        return rt.be.xp.squeeze(self, axis=dims) if dims else self

    table = {
        "view": R(view),
        "reshape": R(view),
        "permute": R(permute),
        "size": R(size),
        "dim": R(lambda rt, i, self: self.ndim),
        "contiguous": R(lambda rt, i, self, memory_format=None: self),
        "t": R(lambda rt, i, self: rt.be.xp.matrix_transpose(self)),
        "sum": reduce("sum"),
        "mean": reduce("mean"),
        "unsqueeze": R(unsqueeze),
        "squeeze": R(squeeze),
        "pow": R(lambda rt, i, self, exponent: self**exponent),
    }
    for name, fn in (
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
        table[name] = fn_rules[fn]
    return table


# ============================================================================ module rules


def module_rule(mod: nn.Module, path: str) -> Callable:
    """fn(rt, index, params, x) for a leaf torch.nn module, or raise Unsupported."""
    p = f"{path}." if path else ""

    def param(params, name):
        return params[p + name]

    if isinstance(mod, nn.Linear):
        has_bias = mod.bias is not None

        def fn(rt, i, params, x):
            return rt.be.linear(x, param(params, "weight"), param(params, "bias") if has_bias else None)

        return fn

    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise Unsupported(f"padding_mode={mod.padding_mode!r}")
        pads = _conv_padding(mod.padding, mod.kernel_size, mod.dilation, mod.stride)
        stride, dilation, groups = _pair(mod.stride), _pair(mod.dilation), mod.groups
        has_bias = mod.bias is not None

        def fn(rt, i, params, x):
            return rt.be.conv2d(
                x,
                param(params, "weight"),
                param(params, "bias") if has_bias else None,
                stride=stride,
                padding=pads,
                dilation=dilation,
                groups=groups,
            )

        return fn

    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    for cls, name in simple.items():
        if type(mod) is cls:
            return lambda rt, i, params, x, _n=name: getattr(rt.be, _n)(x)
    if type(mod) is nn.Identity:
        return lambda rt, i, params, x: x
    if isinstance(mod, nn.GELU):
        _gelu_check(mod.approximate)
        return lambda rt, i, params, x: _gelu(rt.be, x, mod.approximate)
    if isinstance(mod, nn.LeakyReLU):
        return lambda rt, i, params, x: rt.be.leaky_relu(x, mod.negative_slope)
    if isinstance(mod, nn.ELU):
        return lambda rt, i, params, x: rt.be.elu(x, mod.alpha)
    if isinstance(mod, nn.Softplus):
        return lambda rt, i, params, x: rt.be.softplus(x, mod.beta, mod.threshold)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        _softmax_dim(mod.dim)
        name = "softmax" if isinstance(mod, nn.Softmax) else "log_softmax"
        return lambda rt, i, params, x: getattr(rt.be, name)(x, axis=mod.dim)
    if isinstance(mod, nn.Flatten):
        return lambda rt, i, params, x: _flatten(rt.be.xp, x, mod.start_dim, mod.end_dim)
    if isinstance(mod, nn.MaxPool2d):
        _pool_checks("MaxPool2d", mod.dilation, mod.ceil_mode, mod.return_indices)
        return lambda rt, i, params, x: _max_pool(rt.be, x, mod.kernel_size, mod.stride, mod.padding)
    if isinstance(mod, nn.AvgPool2d):
        _pool_checks("AvgPool2d", 1, mod.ceil_mode, False, mod.divisor_override)
        return lambda rt, i, params, x: _avg_pool(
            rt.be, x, mod.kernel_size, mod.stride, mod.padding, mod.count_include_pad
        )
    if type(mod) is nn.Dropout:
        prob, training = float(mod.p), mod.training
        return lambda rt, i, params, x: _dropout(rt, i, x, prob, f"Dropout {path!r}") if training else x
    if isinstance(mod, nn.LayerNorm):
        ndim = len(mod.normalized_shape)
        has_w = mod.weight is not None
        has_b = mod.bias is not None

        def fn(rt, i, params, x):
            w = param(params, "weight") if has_w else None
            b = param(params, "bias") if has_b else None
            return rt.be.layer_norm(x, w, b, normalized_ndim=ndim, eps=mod.eps)

        return fn
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        running = mod.running_mean is not None
        if mod.training and running:
            raise Unsupported(
                "BatchNorm in training mode updates its running statistics in place; "
                "use eval mode (module.eval() / train=False) or track_running_stats=False"
            )
        batch_stats = mod.training or not running
        has_w = mod.weight is not None

        def fn(rt, i, params, x):
            mean = None if batch_stats else param(params, "running_mean")
            var = None if batch_stats else param(params, "running_var")
            w = param(params, "weight") if has_w else None
            b = param(params, "bias") if has_w else None
            return _batch_norm(rt.be, x, mean, var, w, b, mod.eps, batch_stats)

        return fn
    raise Unsupported(None)
