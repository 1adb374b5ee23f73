"""Neural-network ops on PyTorch (torch.nn.functional, with JAX's promotion rules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autodiff import is_tracing


def linear(x, w, b=None):
    # one fused addmm (and its fused forward and backward rules), not x @ w.T + b as two ops
    if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
        # F.linear does not promote; the array API's matmul (and JAX) do: float32 data with
        # float64 params computes in float64
        dt = (
            torch.promote_types(x.dtype, w.dtype)
            if b is None
            else torch.promote_types(torch.promote_types(x.dtype, w.dtype), b.dtype)
        )
        x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
    return F.linear(x, w, b)


def conv2d(x, w, b=None, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    # the bias inside the convolution: a separate broadcast add is one more pass over the
    # output (and, under forward AD, over its tangent), as matmul + add was for linear
    late = b is not None and b.dtype != w.dtype  # F.conv2d does not promote; the add does
    fused = None if late else b
    (pt, pb), (pl, pr) = padding
    if pt == pb and pl == pr:
        y = F.conv2d(x, w, fused, tuple(stride), (pt, pl), tuple(dilation), groups)
    else:
        # torch's conv takes symmetric padding only; pad asymmetric cases ("same", even kernel)
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, fused, tuple(stride), 0, tuple(dilation), groups)
    return y + b.reshape(1, -1, 1, 1) if late else y


def conv2d_weight_grad(x, gz, w_shape, *, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    # torch's weight-gradient kernel directly: vjp would run the forward convolution first,
    # a large share of the forward-activity CNN step
    (pt, pb), (pl, pr) = padding
    if not (pt == pb and pl == pr):
        x, (pt, pl) = F.pad(x, (pl, pr, pt, pb)), (0, 0)
    return torch.nn.grad.conv2d_weight(
        x, tuple(w_shape), gz, tuple(stride), (pt, pl), tuple(dilation), groups
    )


def max_pool2d(x, *, kernel_size, stride, padding=(0, 0)):
    return F.max_pool2d(x, tuple(kernel_size), tuple(stride), tuple(padding))


def avg_pool2d(x, *, kernel_size, stride, padding=(0, 0), count_include_pad=True):
    return F.avg_pool2d(
        x, tuple(kernel_size), tuple(stride), tuple(padding), count_include_pad=count_include_pad
    )


def relu(x):
    return torch.relu(x)


def leaky_relu(x, negative_slope=0.01):
    return F.leaky_relu(x, negative_slope)


def gelu(x, approximate=False):
    return F.gelu(x, approximate="tanh" if approximate else "none")


def sigmoid(x):
    return torch.sigmoid(x)


def softplus(x, beta=1.0, threshold=20.0):
    return F.softplus(x, beta, threshold)


def elu(x, alpha=1.0):
    return F.elu(x, alpha)


def silu(x):
    return F.silu(x)


def tanh(x):
    return torch.tanh(x)


def softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


def log_softmax(x, axis=-1):
    return torch.log_softmax(x, dim=axis)


def nll_values(log_probs, labels):
    if is_tracing(labels) or is_tracing(log_probs):
        # compiled kernels do not check indices, and a torch.func transform's error could not
        # name the row: poison invalid rows instead (the same numbers for valid ones)
        num = log_probs.shape[-1]
        hit = labels[..., None] == torch.arange(num, device=log_probs.device)
        values = -torch.sum(torch.where(hit, log_probs, torch.zeros_like(log_probs)), dim=-1)
        valid = (labels >= 0) & (labels < num)
        return torch.where(valid, values, torch.full_like(values, float("nan")))
    # one gather, which checks every label (the masked sum gives the same numbers in more ops)
    try:
        picked = torch.gather(log_probs, -1, labels.unsqueeze(-1).to(torch.int64))
    except (RuntimeError, IndexError) as exc:
        raise IndexError(str(exc)) from None
    return -picked.squeeze(-1)


def logsumexp(x, axis=None, keepdims=False):
    if axis is None:
        return torch.logsumexp(x.reshape(-1), dim=0)
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def layer_norm(x, weight, bias, *, normalized_ndim, eps=1e-5):
    return F.layer_norm(x, tuple(x.shape[x.ndim - normalized_ndim :]), weight, bias, eps)
