"""Indexing: advanced indexing, takes and gathers, scatters into slices, diagonals, and the
padding modes (constant, reflection, replication).

In-place writes in a forward (``x[:, 0] = y``, ``x[1:3] = y``) reach the decomposed graph as
``select_scatter`` / ``slice_scatter``: functional here, a new array with the slice replaced.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..helpers import Unsupported, cast, device_kw, pad_constant
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("indexing", AtenRule, bounded=True)
register = RULES.register


def _indices(rt, values) -> object:
    return rt.be.asarray(np.asarray(values, dtype=np.int32), **device_kw(rt))


@register(aten.index.Tensor, doc="x[indices] (advanced indexing)")
def _index(rt, info, x, indices):
    ix = tuple(slice(None) if i is None else i for i in indices)
    return x[ix]


@register(aten.index_select.default, doc="xp.take")
def _index_select(rt, info, x, dim, index):
    return rt.be.xp.take(x, index, axis=dim % x.ndim)


@register(aten.gather.default, doc="xp.take_along_axis")
def _gather(rt, info, x, dim, index, sparse_grad=False):
    return rt.be.xp.take_along_axis(x, index, axis=dim % x.ndim)


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
    return xp.where(keep, cast(rt, gathered, x.dtype), x)


@register(aten.select_scatter.default, doc="xp.where with the source taken along dim")
def _select_scatter(rt, info, x, src, dim, index):
    n = int(x.shape[dim % x.ndim])
    return _scatter_positions(rt, x, rt.be.xp.expand_dims(src, axis=dim % x.ndim), dim, [int(index) % n])


@register(aten.slice_scatter.default, doc="xp.where with the source taken along dim")
def _slice_scatter(rt, info, x, src, dim=0, start=None, end=None, step=1):
    n = int(x.shape[dim % x.ndim])
    return _scatter_positions(rt, x, src, dim, range(n)[slice(start, end, step)])


def _meta(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def _index_put_check(node, info):
    indices = list(node.args[1])
    while indices and indices[-1] is None:  # trailing full slices
        indices.pop()
    metas = [_meta(i) for i in indices]
    if not indices or any(i is None for i in indices) or any(m is None for m in metas):
        raise Unsupported("index_put with full slices before or between its index tensors")
    if any(m.dtype == torch.bool for m in metas):
        values = _meta(node.args[2])
        if len(metas) != 1 or values is None or values.numel() != 1:
            raise Unsupported(
                "index_put with a boolean mask and more than one value (its length depends on the data)"
            )


@register(
    aten.index_put.default,
    doc="xp.where of a boolean mask; integer indices: the written rows' values taken by the last "
    "index that writes each (set) or their one-hot xp.matmul sum (accumulate)",
    check=_index_put_check,
)
def _index_put(rt, info, x, indices, values, accumulate=False):
    """``x[indices] = values`` (``+=`` with ``accumulate``) as a new array.

    Index tensors address the leading axes (trailing full slices allowed). A boolean mask
    writes one value where it is true. Integer indices (negative ones count from the end,
    broadcast together) are flattened to positions along the indexed axes: a one-hot
    (positions, rows) array says which position writes which row. Without ``accumulate`` a row
    written more than once keeps the last write (torch leaves the order of repeated indices
    undefined); with it the writes are summed by a matmul of the one-hot, so a non-finite value
    spreads NaN to the other written rows of its column.
    """
    xp = rt.be.xp
    indices = list(indices)
    while indices and indices[-1] is None:
        indices.pop()
    if str(indices[0].dtype).removeprefix("torch.") == "bool":
        mask = xp.reshape(indices[0], tuple(indices[0].shape) + (1,) * (x.ndim - indices[0].ndim))
        v = cast(rt, xp.reshape(values, ()), x.dtype)
        return xp.where(mask, x + v if accumulate else v, x)
    lead = [int(n) for n in x.shape[: len(indices)]]
    rest = tuple(int(n) for n in x.shape[len(indices) :])
    shape = np.broadcast_shapes(*(tuple(i.shape) for i in indices))
    position = None
    for axis_index, n in zip(indices, lead):
        i = xp.broadcast_to(axis_index, shape)
        i = xp.where(i < 0, i + n, i)
        position = i if position is None else position * n + i
    rows = math.prod(lead)
    position = xp.reshape(position, (-1, 1))
    onehot = position == xp.arange(rows, dtype=position.dtype, **device_kw(rt))[None, :]  # (M, rows)
    flat = xp.reshape(x, (rows, -1))
    vals = xp.reshape(cast(rt, xp.broadcast_to(values, tuple(shape) + rest), x.dtype), (onehot.shape[0], -1))
    if accumulate:
        return xp.reshape(flat + xp.matmul(xp.matrix_transpose(xp.astype(onehot, x.dtype)), vals), x.shape)
    # the last write of each row: the largest position index m with onehot[m, row]
    m = onehot.shape[0]
    order = xp.arange(1, m + 1, dtype=position.dtype, **device_kw(rt))[:, None]
    last = xp.max(xp.where(onehot, order, xp.zeros_like(order)), axis=0)  # 0: not written
    taken = xp.take(vals, xp.where(last > 0, last - 1, last), axis=0)
    return xp.reshape(xp.where((last > 0)[:, None], taken, flat), x.shape)


@register(aten.diagonal.default, doc="x[..., rows, cols] (advanced indexing)")
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


# ============================================================================ padding


@register(aten.constant_pad_nd.default, doc="xp.concat of xp.full")
def _constant_pad(rt, info, x, pad, value=0):
    return pad_constant(rt, x, pad, value)


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


for _op in (aten.reflection_pad1d.default, aten.reflection_pad2d.default):
    RULES.add(_op, _index_pad("reflect"), doc="xp.take of reflected indices")
for _op in (aten.replication_pad1d.default, aten.replication_pad2d.default):
    RULES.add(_op, _index_pad("replicate"), doc="xp.take of clipped indices")
