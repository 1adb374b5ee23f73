"""Neural-network ops on JAX (the array API lacks them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(x, w, b=None):
    y = jnp.matmul(x, jnp.matrix_transpose(w))
    return y if b is None else y + b


def conv2d(x, w, b=None, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    y = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=tuple(stride),
        padding=tuple(tuple(p) for p in padding),
        rhs_dilation=tuple(dilation),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=groups,
    )
    return y if b is None else y + jnp.reshape(b, (1, -1, 1, 1))


def conv2d_weight_grad(x, gz, w_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    # the vjp in w: under jit XLA drops its unused forward convolution
    w0 = jnp.zeros(tuple(w_shape), dtype=gz.dtype)
    _, pullback = jax.vjp(
        lambda w: conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups), w0
    )
    return pullback(gz)[0]


def max_pool2d(x, *, kernel_size, stride, padding=(0, 0)):
    pads = ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1]))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, *kernel_size), (1, 1, *stride), pads)


def avg_pool2d(x, *, kernel_size, stride, padding=(0, 0), count_include_pad=True):
    pads = ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1]))
    window, strides = (1, 1, *kernel_size), (1, 1, *stride)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    if count_include_pad:
        return total / (kernel_size[0] * kernel_size[1])
    ones = jnp.ones((1, 1, *x.shape[2:]), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / counts


def relu(x):
    return jax.nn.relu(x)


def leaky_relu(x, negative_slope=0.01):
    # not jax.nn.leaky_relu: its slope at x = 0 is 1, torch's is negative_slope
    return jnp.where(x > 0, x, negative_slope * x)


def gelu(x, approximate=False):
    # jax.nn.gelu defaults to the tanh approximation; torch to the exact erf form
    return jax.nn.gelu(x, approximate=approximate)


def sigmoid(x):
    return jax.nn.sigmoid(x)


def softplus(x, beta=1.0, threshold=20.0):
    # torch's rule: linear above threshold
    bx = beta * x
    return jnp.where(bx > threshold, x, jax.nn.softplus(bx) / beta)


def elu(x, alpha=1.0):
    return jax.nn.elu(x, alpha)


def silu(x):
    return jax.nn.silu(x)


def tanh(x):
    return jnp.tanh(x)


def softmax(x, axis=-1):
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(x, axis=axis)


def nll_values(log_probs, labels):
    # a masked sum (XLA fuses it): the gather's numbers, and NaN for an invalid label when
    # traced (no error can be raised inside a compiled program)
    num = log_probs.shape[-1]
    hit = labels[..., None] == jnp.arange(num)
    values = -jnp.sum(jnp.where(hit, log_probs, jnp.zeros_like(log_probs)), axis=-1)
    valid = jnp.logical_and(labels >= 0, labels < num)
    if isinstance(valid, jax.core.Tracer):
        return jnp.where(valid, values, jnp.full_like(values, jnp.nan))
    if not bool(jnp.all(valid)):
        raise IndexError(f"a label is outside [0, {num})")
    return values


def logsumexp(x, axis=None, keepdims=False):
    return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


def layer_norm(x, weight, bias, *, normalized_ndim, eps=1e-5):
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out
