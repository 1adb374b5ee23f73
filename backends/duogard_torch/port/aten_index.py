"""The core ATen rules for creation (``full``, ``arange`` ...), filled copies, scatters into
slices, diagonals and reflection/replication padding: part of the table of :mod:`.aten`.

In-place writes in a forward (``x[:, 0] = y``, ``x[1:3] = y``) reach the decomposed graph as
``select_scatter`` / ``slice_scatter``: functional here, a new array with the slice replaced.
Each rule is ``fn(rt, info, *args, **kwargs)``; see :class:`~duogard_torch.port.aten.AtenRule`.
"""

from __future__ import annotations

import numpy as np
import torch

from .aten import AtenRule, device_kw, dtype_of
from .aten_core import _div_mode
from .helpers import Unsupported

__all__ = ["index_rules"]

aten = torch.ops.aten


def _indices(rt, values) -> object:
    return rt.be.asarray(np.asarray(values, dtype=np.int32), **device_kw(rt))


def _scatter_positions(rt, x, src, dim, positions):
    """``x`` with its entries at ``positions`` along ``dim`` replaced by ``src``'s, in order."""
    xp = rt.be.xp
    dim = dim % x.ndim
    n = int(x.shape[dim])
    source = np.zeros(n, dtype=np.int32)
    mask = np.zeros(n, dtype=bool)
    for j, p in enumerate(positions):
        source[p], mask[p] = j, True
    gathered = xp.take(src, _indices(rt, source), axis=dim)
    shape = [1] * x.ndim
    shape[dim] = n
    keep = xp.reshape(rt.be.asarray(mask, **device_kw(rt)), tuple(shape))
    return xp.where(keep, xp.astype(gathered, x.dtype), x)


def _select_scatter(rt, info, x, src, dim, index):
    n = int(x.shape[dim % x.ndim])
    return _scatter_positions(rt, x, rt.be.xp.expand_dims(src, axis=dim % x.ndim), dim, [int(index) % n])


def _slice_scatter(rt, info, x, src, dim=0, start=None, end=None, step=1):
    n = int(x.shape[dim % x.ndim])
    return _scatter_positions(rt, x, src, dim, range(n)[slice(start, end, step)])


def _diagonal(rt, info, x, offset=0, dim1=0, dim2=1):
    xp = rt.be.xp
    d1, d2 = dim1 % x.ndim, dim2 % x.ndim
    rest = [d for d in range(x.ndim) if d not in (d1, d2)]
    y = xp.permute_dims(x, (*rest, d1, d2))
    n1, n2 = int(x.shape[d1]), int(x.shape[d2])
    length = max(0, min(n1, n2 - offset) if offset >= 0 else min(n1 + offset, n2))
    rows = np.arange(length) + max(-offset, 0)
    cols = np.arange(length) + max(offset, 0)
    return y[..., _indices(rt, rows), _indices(rt, cols)]


def _pad_index(n: int, left: int, right: int, mode: str) -> np.ndarray:
    p = np.arange(-left, n + right)
    if mode == "reflect":
        p = np.abs(p)
        return np.where(p >= n, 2 * (n - 1) - p, p)
    return np.clip(p, 0, n - 1)


def _index_pad(mode):
    def fn(rt, info, x, padding):
        xp = rt.be.xp
        for i in range(len(padding) // 2):
            axis = x.ndim - 1 - i
            index = _pad_index(int(x.shape[axis]), int(padding[2 * i]), int(padding[2 * i + 1]), mode)
            x = xp.take(x, _indices(rt, index), axis=axis)
        return x

    return fn


def _copy(rt, info, x, src, non_blocking=False):
    xp = rt.be.xp
    return xp.astype(xp.broadcast_to(src, tuple(x.shape)), x.dtype)


def _empty(rt, info, size, *args, dtype=None, **kwargs):
    return _full(rt, size, 0, dtype if dtype is not None else torch.float32)


def _scalar_dtype(value):
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    return torch.float32


def _full(rt, shape, value, dtype):
    dt = dtype_of(rt.be, dtype if dtype is not None else _scalar_dtype(value))
    return rt.be.xp.full(tuple(int(s) for s in shape), value, dtype=dt, **device_kw(rt))


def _creation_check(node, info):
    device = node.kwargs.get("device")
    if device is not None and torch.device(device).type == "meta":
        raise Unsupported("a tensor created on the meta device")


def _torch_dtype(x):
    name = str(x.dtype).removeprefix("torch.")
    return getattr(torch, name)


def _arange(rt, info, start, end=None, step=1, dtype=None, **_):
    if dtype is None:
        dtype = torch.float32 if any(isinstance(v, float) for v in (start, end, step)) else torch.int64
    return rt.be.xp.arange(start, end, step, dtype=dtype_of(rt.be, dtype), **device_kw(rt))


def index_rules() -> dict:
    """The rules of this module (merged into :func:`duogard_torch.port.aten.rules`)."""
    R = AtenRule
    return {
        aten.full.default: R(
            lambda rt, info, size, fill_value, dtype=None, **_: _full(rt, size, fill_value, dtype),
            "xp.full",
            _creation_check,
        ),
        aten.full_like.default: R(
            lambda rt, info, x, fill_value, dtype=None, **_: _full(
                rt, x.shape, fill_value, dtype or _torch_dtype(x)
            ),
            "xp.full",
        ),
        aten.zeros_like.default: R(
            lambda rt, info, x, dtype=None, **_: _full(rt, x.shape, 0, dtype or _torch_dtype(x)),
            "xp.full",
        ),
        aten.ones_like.default: R(
            lambda rt, info, x, dtype=None, **_: _full(rt, x.shape, 1, dtype or _torch_dtype(x)),
            "xp.full",
        ),
        aten.scalar_tensor.default: R(
            lambda rt, info, s, dtype=None, **_: _full(rt, (), s, dtype), "xp.full", _creation_check
        ),
        aten.arange.start_step: R(_arange, "xp.arange", _creation_check),
        aten.arange.start: R(
            lambda rt, info, start, end, dtype=None, **kw: _arange(rt, info, start, end, 1, dtype),
            "xp.arange",
        ),
        aten.arange.default: R(
            lambda rt, info, end, dtype=None, **kw: _arange(rt, info, 0, end, 1, dtype), "xp.arange"
        ),
        aten.select_scatter.default: R(_select_scatter, "xp.where with the source taken along dim"),
        aten.slice_scatter.default: R(_slice_scatter, "xp.where with the source taken along dim"),
        aten.diagonal.default: R(_diagonal, "x[..., rows, cols] (advanced indexing)"),
        aten.reflection_pad1d.default: R(_index_pad("reflect"), "xp.take of reflected indices"),
        aten.reflection_pad2d.default: R(_index_pad("reflect"), "xp.take of reflected indices"),
        aten.replication_pad1d.default: R(_index_pad("replicate"), "xp.take of clipped indices"),
        aten.replication_pad2d.default: R(_index_pad("replicate"), "xp.take of clipped indices"),
        aten.copy.default: R(_copy, "xp.broadcast_to, xp.astype"),
        aten.fill.Scalar: R(lambda rt, info, x, value: _full(rt, x.shape, value, _torch_dtype(x)), "xp.full"),
        aten.empty.memory_format: R(_empty, "xp.full(0) (an uninitialised tensor, written before read)"),
        aten.empty_strided.default: R(
            lambda rt, info, size, stride, dtype=None, **kw: _empty(rt, info, size, dtype=dtype),
            "xp.full(0) (an uninitialised tensor, written before read)",
        ),
        aten.exp2.default: R(lambda rt, info, x: rt.be.xp.exp(x * float(np.log(2.0))), "xp.exp(x * log 2)"),
        aten.div.Scalar_mode: R(
            lambda rt, info, a, b, rounding_mode=None: _div_mode(rt, info, a, b, rounding_mode),
            "a / b, xp.floor / xp.trunc",
        ),
        **{
            getattr(aten, op).Scalar: R(
                lambda rt, info, a, b, _op=op: getattr(rt.be.xp, _op)(a, b), f"xp.{op}"
            )
            for op in ("bitwise_and", "bitwise_or", "bitwise_xor")
        },
    }
