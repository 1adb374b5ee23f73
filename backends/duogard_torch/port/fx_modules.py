"""The rules that lower leaf ``torch.nn`` modules of a ``torch.fx`` graph (``nn.Linear``,
``nn.Conv2d`` ...) onto duogard's backend ops: :func:`module_rule` (used by :mod:`.lower`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .fx_shared import (
    avg_pool,
    batch_norm,
    conv_padding,
    dropout,
    flatten,
    gelu,
    gelu_check,
    max_pool,
    pool_checks,
    softmax_dim,
)
from .helpers import Unsupported, pair

__all__ = ["module_rule"]


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
        pads = conv_padding(mod.padding, mod.kernel_size, mod.dilation, mod.stride)
        stride, dilation, groups = pair(mod.stride), pair(mod.dilation), mod.groups
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
        gelu_check(mod.approximate)
        return lambda rt, i, params, x: gelu(rt.be, x, mod.approximate)
    if isinstance(mod, nn.LeakyReLU):
        return lambda rt, i, params, x: rt.be.leaky_relu(x, mod.negative_slope)
    if isinstance(mod, nn.ELU):
        return lambda rt, i, params, x: rt.be.elu(x, mod.alpha)
    if isinstance(mod, nn.Softplus):
        return lambda rt, i, params, x: rt.be.softplus(x, mod.beta, mod.threshold)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        softmax_dim(mod.dim)
        name = "softmax" if isinstance(mod, nn.Softmax) else "log_softmax"
        return lambda rt, i, params, x: getattr(rt.be, name)(x, axis=mod.dim)
    if isinstance(mod, nn.Flatten):
        return lambda rt, i, params, x: flatten(rt.be.xp, x, mod.start_dim, mod.end_dim)
    if isinstance(mod, nn.MaxPool2d):
        pool_checks("MaxPool2d", mod.dilation, mod.ceil_mode, mod.return_indices)
        return lambda rt, i, params, x: max_pool(rt.be, x, mod.kernel_size, mod.stride, mod.padding)
    if isinstance(mod, nn.AvgPool2d):
        pool_checks("AvgPool2d", 1, mod.ceil_mode, False, mod.divisor_override)
        return lambda rt, i, params, x: avg_pool(
            rt.be, x, mod.kernel_size, mod.stride, mod.padding, mod.count_include_pad
        )
    if type(mod) is nn.Dropout:
        prob, training = float(mod.p), mod.training
        return lambda rt, i, params, x: dropout(rt, i, x, prob, f"Dropout {path!r}") if training else x
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
            return batch_norm(rt.be, x, mean, var, w, b, mod.eps, batch_stats)

        return fn
    raise Unsupported(None)
