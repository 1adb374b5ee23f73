"""Lower a ``torch.nn.Module``'s forward onto duogard's backend ops (torch.fx).

The module is traced once per mode (eval / train) with ``torch.fx``'s symbolic tracer; every
node of the graph is mapped to a small function written against the backend contract
(``be.xp``, ``be.conv2d``, ``be.max_pool2d`` ...). The resulting :class:`LoweredGraph` runs on
any backend: with JAX arrays it is differentiable by ``jax.jvp``/``jax.grad`` and jittable.

Every node is checked when the graph is lowered, so an unsupported op is reported together
with all the others of the graph (:class:`UnsupportedTorchOpsError`), each with its node name
and module path. A ``torch.autograd.Function`` is recorded as one opaque node (its custom
backward/jvp cannot be lowered) instead of being traced through.

This module is framework-specific: it imports torch, and is only imported lazily.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from duogard.interop._torch_module import UnsupportedTorchOpsError

__all__ = ["LoweredGraph", "UnsupportedTorchOpsError", "lower_module"]


class _Unsupported(Exception):
    """Raised by a rule builder: this node cannot be lowered (the message says why)."""


@dataclass
class _RunContext:
    be: Any
    key: Any
    params: dict

    def key_for(self, index: int, what: str):
        if self.key is None:
            raise ValueError(f"{what} in training mode needs an explicit random key: "
                             "model.apply(params, x, train=True, key=be.key(seed))")
        return self.be.fold_in(self.key, index)


@dataclass
class _Step:
    index: int
    name: str
    op: str              # fx op kind
    fn: Callable | None  # fn(rt, index, *args, **kwargs); None for placeholder / output
    args: tuple
    kwargs: dict


class LoweredGraph:
    """A module's forward as a list of backend-neutral steps; call :meth:`run`."""

    def __init__(self, steps: list[_Step], output_args, module_name: str):
        self.steps = steps
        self._output = output_args
        self.module_name = module_name

    def run(self, be, params: dict, x, *, key=None):
        """Evaluate the graph on backend ``be``: ``params`` maps state_dict names to arrays of ``be``;
        ``key`` (a key of ``be``) is needed only by dropout in training mode."""
        env: dict[str, Any] = {}
        rt = _RunContext(be, key, params)

        def value(node):
            return env[node.name]

        for step in self.steps:
            if step.op == "placeholder":
                env[step.name] = x if step.index == 0 else step.args[0]
            else:
                args = torch.fx.node.map_arg(step.args, value)
                kwargs = torch.fx.node.map_arg(step.kwargs, value)
                env[step.name] = step.fn(rt, step.index, *args, **kwargs)
        return torch.fx.node.map_arg(self._output, value)

    def __repr__(self) -> str:
        return f"LoweredGraph({self.module_name}, {len(self.steps)} steps)"


# ============================================================================ tracing

class _OpaqueFunction:
    """A ``torch.autograd.Function`` call kept as one graph node (never lowered)."""

    def __init__(self, cls):
        self.cls = cls
        self.__name__ = f"{cls.__name__}.apply"
        self.__qualname__ = self.__name__
        self.__module__ = cls.__module__

    def __call__(self, *args, **kwargs):
        return self.cls.apply(*args, **kwargs)


def _has_proxy(args) -> bool:
    found = []
    torch.fx.node.map_aggregate(args, lambda a: found.append(isinstance(a, torch.fx.Proxy)))
    return any(found)


def trace(module: nn.Module) -> torch.fx.Graph:
    """Symbolically trace ``module`` (in its current train/eval mode) into an fx Graph.

    ``torch.autograd.Function.apply`` is intercepted while tracing, so a custom Function is
    recorded as one node rather than silently inlined (its backward/jvp would be lost).
    """
    tracer = torch.fx.Tracer()
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if _has_proxy((args, kwargs)):
            return tracer.create_proxy("call_function", _OpaqueFunction(cls), args, kwargs)
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        return tracer.trace(module)
    except Exception as exc:
        raise NotImplementedError(
            f"from_torch: torch.fx cannot trace {type(module).__name__}.forward, so it cannot run on "
            f"a non-torch backend ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Typical "
            "cause: Python control flow on tensor values. On the torch backend the module runs as is."
        ) from exc
    finally:
        torch.autograd.Function.apply = original


# ============================================================================ helpers

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _static(value, what: str):
    """A trace-time constant argument (an fx Node here means it depends on data)."""
    if isinstance(value, torch.fx.Node):
        raise _Unsupported(f"{what} must be a constant, not computed from tensors")
    return value


def _conv_padding(padding, kernel, dilation, stride):
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if _pair(stride) != (1, 1):
                raise _Unsupported("padding='same' with stride != 1")
            out = []
            for k, d in zip(kernel, _pair(dilation)):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise _Unsupported(f"padding={padding!r}")
    ph, pw = _pair(padding)
    return ((ph, ph), (pw, pw))


def _dim(d, ndim) -> int:
    return d + ndim if d < 0 else d


def _flatten(xp, x, start_dim=0, end_dim=-1):
    shape = tuple(x.shape)
    if not shape:
        return xp.reshape(x, (1,))
    s, e = _dim(start_dim, len(shape)), _dim(end_dim, len(shape))
    return xp.reshape(x, shape[:s] + (math.prod(shape[s:e + 1]),) + shape[e + 1:])


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
        raise _Unsupported(f"dtype={dtype}")


def _pool_checks(kind, dilation=1, ceil_mode=False, return_indices=False, divisor_override=None):
    if _pair(_static(dilation, "dilation")) != (1, 1):
        raise _Unsupported(f"{kind} with dilation != 1")
    if _static(ceil_mode, "ceil_mode"):
        raise _Unsupported(f"{kind} with ceil_mode=True")
    if _static(return_indices, "return_indices"):
        raise _Unsupported(f"{kind} with return_indices=True")
    if _static(divisor_override, "divisor_override") is not None:
        raise _Unsupported(f"{kind} with divisor_override")


def _max_pool(be, x, kernel_size, stride, padding):
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else _pair(stride)
    return be.max_pool2d(x, kernel_size=k, stride=s, padding=_pair(padding))


def _avg_pool(be, x, kernel_size, stride, padding, count_include_pad):
    k = _pair(kernel_size)
    s = k if stride is None or stride == [] or stride == () else _pair(stride)
    return be.avg_pool2d(x, kernel_size=k, stride=s, padding=_pair(padding),
                         count_include_pad=bool(count_include_pad))


def _gelu(be, x, approximate):
    if approximate not in ("none", "tanh"):
        raise _Unsupported(f"gelu approximate={approximate!r}")
    return be.gelu(x, approximate=approximate == "tanh")


def _softmax_dim(dim):
    if _static(dim, "dim") is None:
        raise _Unsupported("softmax without an explicit dim")


# ============================================================================ function rules
# Each rule is fn(rt, index, <torch's parameter names and defaults>); an optional check
# (same parameters, minus rt/index) runs at lowering time with fx Nodes for tensor arguments.

@dataclass(frozen=True)
class _Rule:
    fn: Callable
    check: Callable | None = None


def _rules() -> dict[Any, _Rule]:
    R = _Rule

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
        return rt.be.conv2d(input, weight, bias, stride=_pair(stride),
                            padding=_conv_padding(padding, kernel, dilation, stride),
                            dilation=_pair(dilation), groups=int(groups))

    def conv2d_check(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups)):
            _static(v, name)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise _Unsupported(f"padding={padding!r}")

    def max_pool2d(rt, i, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                   return_indices=False):
        return _max_pool(rt.be, input, kernel_size, stride, padding)

    def max_pool2d_check(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                         return_indices=False):
        _pool_checks("max_pool2d", dilation, ceil_mode, return_indices)

    def avg_pool2d(rt, i, input, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None):
        return _avg_pool(rt.be, input, kernel_size, stride, padding, count_include_pad)

    def avg_pool2d_check(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                         count_include_pad=True, divisor_override=None):
        _pool_checks("avg_pool2d", 1, ceil_mode, False, divisor_override)

    def dropout(rt, i, input, p=0.5, training=True, inplace=False):
        return _dropout(rt, i, input, float(p), "F.dropout") if training else input

    def layer_norm(rt, i, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        return rt.be.layer_norm(input, weight, bias, normalized_ndim=len(shape), eps=float(eps))

    def batch_norm(rt, i, input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        return _batch_norm(rt.be, input, running_mean, running_var, weight, bias, float(eps), training)

    def batch_norm_check(input, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5):
        if _static(training, "training") and running_mean is not None:
            raise _Unsupported("batch_norm in training mode updates running statistics in place; "
                               "use eval mode")

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
            raise _Unsupported(f"div with rounding_mode={rounding_mode!r}")

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
            raise _Unsupported(f"tensor attribute .{name}")

    def leaky_relu(rt, i, input, negative_slope=0.01, inplace=False):
        return rt.be.leaky_relu(input, negative_slope)

    def elu(rt, i, input, alpha=1.0, inplace=False):
        return rt.be.elu(input, alpha)

    def softplus(rt, i, input, beta=1.0, threshold=20.0):
        return rt.be.softplus(input, beta, threshold)

    table = {
        operator.add: binary(operator.add), operator.sub: binary(operator.sub),
        operator.mul: binary(operator.mul), operator.truediv: binary(operator.truediv),
        operator.matmul: R(lambda rt, i, a, b: a @ b),
        operator.neg: R(lambda rt, i, a: -a), operator.pos: R(lambda rt, i, a: a),
        operator.pow: R(lambda rt, i, a, b: a ** b),
        operator.getitem: R(lambda rt, i, a, b: a[b]),
        getattr: R(getattr_, getattr_check),
        torch.add: binary(operator.add), torch.sub: binary(operator.sub),
        torch.mul: R(lambda rt, i, input, other: input * other),
        torch.div: R(div, div_check), torch.true_divide: R(lambda rt, i, input, other: input / other),
        torch.matmul: R(lambda rt, i, input, other: rt.be.xp.matmul(input, other)),
        torch.mm: R(lambda rt, i, input, mat2: rt.be.xp.matmul(input, mat2)),
        torch.neg: R(lambda rt, i, input: -input),
        torch.relu: unary("relu"), torch.tanh: unary("tanh"), torch.sigmoid: unary("sigmoid"),
        torch.exp: xp_unary("exp"), torch.log: xp_unary("log"), torch.sqrt: xp_unary("sqrt"),
        torch.abs: xp_unary("abs"), torch.square: xp_unary("square"),
        torch.flatten: R(flatten), torch.reshape: R(reshape), torch.cat: R(cat),
        torch.transpose: R(transpose),
        torch.softmax: softmax("softmax"), torch.log_softmax: softmax("log_softmax"),
        F.relu: unary("relu"), F.tanh: unary("tanh"), F.sigmoid: unary("sigmoid"),
        F.silu: unary("silu"),
        F.gelu: R(lambda rt, i, input, approximate="none": _gelu(rt.be, input, approximate),
                  lambda input, approximate="none": _gelu_check(approximate)),
        F.leaky_relu: R(leaky_relu), F.elu: R(elu), F.softplus: R(softplus),
        F.softmax: softmax("softmax"), F.log_softmax: softmax("log_softmax"),
        F.linear: R(linear), F.conv2d: R(conv2d, conv2d_check),
        F.max_pool2d: R(max_pool2d, max_pool2d_check), F.avg_pool2d: R(avg_pool2d, avg_pool2d_check),
        F.dropout: R(dropout), F.layer_norm: R(layer_norm),
        F.batch_norm: R(batch_norm, batch_norm_check),
    }
    return table


def _gelu_check(approximate):
    if _static(approximate, "approximate") not in ("none", "tanh"):
        raise _Unsupported(f"gelu approximate={approximate!r}")


# method name -> function rule it is equivalent to (self is the first argument), or own rule
def _method_rules(fn_rules) -> dict[str, _Rule]:
    R = _Rule

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
            dims = tuple(_dim(d, self.ndim) for d in ((dim,) if isinstance(dim, int) else dim)
                         if self.shape[d] == 1)
        return rt.be.xp.squeeze(self, axis=dims) if dims else self

    table = {
        "view": R(view), "reshape": R(view), "permute": R(permute),
        "size": R(size), "dim": R(lambda rt, i, self: self.ndim),
        "contiguous": R(lambda rt, i, self, memory_format=None: self),
        "t": R(lambda rt, i, self: rt.be.xp.matrix_transpose(self)),
        "sum": reduce("sum"), "mean": reduce("mean"),
        "unsqueeze": R(unsqueeze), "squeeze": R(squeeze),
        "pow": R(lambda rt, i, self, exponent: self ** exponent),
    }
    for name, fn in (("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("div", torch.div),
                     ("matmul", torch.matmul), ("neg", torch.neg), ("relu", torch.relu),
                     ("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("exp", torch.exp),
                     ("log", torch.log), ("sqrt", torch.sqrt), ("abs", torch.abs),
                     ("flatten", torch.flatten), ("transpose", torch.transpose),
                     ("softmax", torch.softmax), ("log_softmax", torch.log_softmax)):
        table[name] = fn_rules[fn]
    return table


# ============================================================================ module rules

def _module_rule(mod: nn.Module, path: str) -> Callable:
    """fn(rt, index, params, x) for a leaf torch.nn module, or raise _Unsupported."""
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
            raise _Unsupported(f"padding_mode={mod.padding_mode!r}")
        pads = _conv_padding(mod.padding, mod.kernel_size, mod.dilation, mod.stride)
        stride, dilation, groups = _pair(mod.stride), _pair(mod.dilation), mod.groups
        has_bias = mod.bias is not None

        def fn(rt, i, params, x):
            return rt.be.conv2d(x, param(params, "weight"), param(params, "bias") if has_bias else None,
                                stride=stride, padding=pads, dilation=dilation, groups=groups)
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
        return lambda rt, i, params, x: _avg_pool(rt.be, x, mod.kernel_size, mod.stride, mod.padding,
                                                  mod.count_include_pad)
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
            raise _Unsupported("BatchNorm in training mode updates its running statistics in place; "
                               "use eval mode (module.eval() / train=False) or track_running_stats=False")
        batch_stats = mod.training or not running
        has_w = mod.weight is not None

        def fn(rt, i, params, x):
            mean = None if batch_stats else param(params, "running_mean")
            var = None if batch_stats else param(params, "running_var")
            w = param(params, "weight") if has_w else None
            b = param(params, "bias") if has_w else None
            return _batch_norm(rt.be, x, mean, var, w, b, mod.eps, batch_stats)
        return fn
    raise _Unsupported(None)


# ============================================================================ lowering

def _describe(target) -> str:
    """A readable name for an fx call target: ``torch.sort``, ``torch.nn.functional.gelu`` ..."""
    if isinstance(target, str):
        return target
    if isinstance(target, _OpaqueFunction):
        return f"custom torch.autograd.Function {target.cls.__module__}.{target.cls.__qualname__}"
    for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("torch.fft", torch.fft),
                              ("torch.linalg", torch.linalg), ("torch.special", torch.special),
                              ("operator", operator)):
        name = getattr(target, "__name__", None)
        for candidate in (name, name and name.split("_", 1)[-1]):
            if candidate and getattr(namespace, candidate, None) is target:
                return f"{prefix}.{candidate}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{mod}.{name}" if mod else name


def _module_path(node, root) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        path = node.target
    elif stack:
        path = list(stack.values())[-1][0]
    else:
        return f"'' ({type(root).__name__}, the root)"
    try:
        cls = type(root.get_submodule(path)).__name__
    except AttributeError:
        cls = "?"
    return f"{path!r} ({cls})"


def _bind_check(rule: _Rule, node) -> None:
    if rule.check is None:
        params = list(inspect.signature(rule.fn).parameters.values())[2:]
        sig = inspect.Signature(params)
        try:
            sig.bind(*node.args, **node.kwargs)
        except TypeError as exc:
            raise _Unsupported(f"arguments not understood: {exc}") from None
        return
    try:
        inspect.signature(rule.check).bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise _Unsupported(f"arguments not understood: {exc}") from None
    rule.check(*node.args, **node.kwargs)


def lower_module(module: nn.Module, *, train: bool) -> LoweredGraph:
    """Trace ``module`` in train or eval mode and lower every node; raise one error listing all
    unsupported ops. The module's mode is restored afterwards."""
    was_training = module.training
    module.train(train)
    try:
        graph = trace(module)
        return _lower_graph(module, graph)
    finally:
        module.train(was_training)


def _lower_graph(module: nn.Module, graph: torch.fx.Graph) -> LoweredGraph:
    fn_rules = _rules()
    method_rules = _method_rules(fn_rules)
    state_names = set(module.state_dict().keys())
    steps, bad, bad_names, output, n_placeholders = [], [], set(), None, 0

    for index, node in enumerate(graph.nodes):
        try:
            if node.op == "placeholder":
                if n_placeholders > 0 and not node.args:
                    raise _Unsupported("forward takes more than one required input; "
                                       "from_torch models take one input x")
                steps.append(_Step(n_placeholders, node.name, "placeholder", None, tuple(node.args), {}))
                n_placeholders += 1
            elif node.op == "get_attr":
                rule = _get_attr_rule(module, node.target, state_names)
                steps.append(_Step(index, node.name, "get_attr", rule, (), {}))
            elif node.op == "call_module":
                sub = module.get_submodule(node.target)
                mrule = _module_rule(sub, node.target)
                if node.kwargs or len(node.args) != 1:
                    raise _Unsupported("called with more than one argument")
                steps.append(_Step(index, node.name, "call_module",
                                   lambda rt, i, x, _f=mrule: _f(rt, i, rt.params, x),
                                   tuple(node.args), {}))
            elif node.op in ("call_function", "call_method"):
                table = fn_rules if node.op == "call_function" else method_rules
                try:
                    rule = table.get(node.target)
                except TypeError:  # unhashable target
                    rule = None
                if rule is None:
                    raise _Unsupported(None)
                _bind_check(rule, node)
                steps.append(_Step(index, node.name, node.op, rule.fn, tuple(node.args), dict(node.kwargs)))
            elif node.op == "output":
                output = node.args[0]
        except _Unsupported as exc:
            bad_names.add(node.name)
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if node.target is getattr and source is not None and source.name in bad_names:
                continue  # an attribute of an unsupported op's result (.values, .real): reported with it
            bad.append(_report(node, source, module, exc.args[0] if exc.args else None))

    if bad:
        raise UnsupportedTorchOpsError(type(module).__name__, bad)
    return LoweredGraph(steps, output, type(module).__name__)


def _report(node, source, module: nn.Module, reason) -> tuple[str, str, str, str | None]:
    """(node name, op, module path, reason) of an unsupported node."""
    where = node
    if node.op == "call_module":
        cls = type(module.get_submodule(node.target))
        op = f"module {cls.__module__}.{cls.__qualname__}"
    elif node.target is getattr and len(node.args) == 2:
        op, reason = f"tensor attribute .{node.args[1]}", None
        # fx creates attribute nodes lazily (at their first use): report their input's module
        where = source if source is not None else node
    else:
        op = ("tensor method ." if node.op == "call_method" else "") + _describe(node.target)
    return node.name, op, _module_path(where, module), reason


def _get_attr_rule(module: nn.Module, target: str, state_names: set) -> Callable:
    if target in state_names:
        return lambda rt, i: rt.params[target]
    # a plain tensor attribute (not a parameter or buffer): a constant of the graph
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise _Unsupported(f"attribute {target!r} of type {type(obj).__name__}")
    const = obj.detach().cpu().numpy().copy()
    return lambda rt, i: rt.be.asarray(const)
