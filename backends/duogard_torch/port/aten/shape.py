"""Shapes and views: reshapes, permutations, broadcasting, squeezes, selections and slices,
splits and joins, flips, rolls, tiles; copies and casts; multi-output results.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..helpers import Unsupported, cast, device_kw, slice_axis
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("shape", AtenRule, bounded=True)
register = RULES.register


@register(aten.view.default, aten._unsafe_view.default, doc="xp.reshape")
def _view(rt, info, x, size):
    return rt.be.xp.reshape(x, tuple(size))


@register(aten.reshape.default, doc="xp.reshape")
def _reshape(rt, info, x, shape):
    return rt.be.xp.reshape(x, tuple(shape))


@register(aten.permute.default, doc="xp.permute_dims")
def _permute(rt, info, x, dims):
    return rt.be.xp.permute_dims(x, tuple(d % x.ndim for d in dims))


@register(aten.t.default, doc="xp.permute_dims")
def _t(rt, info, x):
    return rt.be.xp.permute_dims(x, tuple(reversed(range(x.ndim))))


@register(aten.transpose.int, doc="xp.permute_dims")
def _transpose(rt, info, x, dim0, dim1):
    axes = list(range(x.ndim))
    a, b = dim0 % x.ndim, dim1 % x.ndim
    axes[a], axes[b] = axes[b], axes[a]
    return rt.be.xp.permute_dims(x, tuple(axes))


@register(aten.expand.default, doc="xp.broadcast_to")
def _expand(rt, info, x, size, implicit=False):
    size = list(size)
    lead = len(size) - x.ndim
    shape = tuple(int(x.shape[i - lead]) if s == -1 else int(s) for i, s in enumerate(size))
    return rt.be.xp.broadcast_to(x, shape)


@register(aten.unsqueeze.default, doc="xp.expand_dims")
def _unsqueeze(rt, info, x, dim):
    return rt.be.xp.expand_dims(x, axis=dim % (x.ndim + 1))


def _squeeze(xp, x, dims):
    dims = tuple(d % x.ndim for d in dims if x.shape[d] == 1) if x.ndim else ()
    return xp.squeeze(x, axis=dims) if dims else x


@register(aten.squeeze.dims, doc="xp.squeeze")
def _squeeze_dims(rt, info, x, dim):
    return _squeeze(rt.be.xp, x, dim)


@register(aten.squeeze.dim, doc="xp.squeeze")
def _squeeze_dim(rt, info, x, dim):
    return _squeeze(rt.be.xp, x, (dim,))


@register(aten.squeeze.default, doc="xp.squeeze")
def _squeeze_all(rt, info, x):
    return _squeeze(rt.be.xp, x, range(x.ndim))


@register(aten.select.int, doc="x[..., i]")
def _select(rt, info, x, dim, index):
    ix = [slice(None)] * x.ndim
    ix[dim % x.ndim] = int(index)
    return x[tuple(ix)]


@register(aten.slice.Tensor, doc="x[..., start:end:step]")
def _slice(rt, info, x, dim=0, start=None, end=None, step=1):
    return slice_axis(x, dim, start, end, step)


def _split_sizes(x, sizes, dim):
    out, start = [], 0
    for s in sizes:
        out.append(slice_axis(x, dim, start, start + int(s)))
        start += int(s)
    return out


@register(aten.split_with_sizes.default, doc="slices")
def _split_with_sizes(rt, info, x, split_sizes, dim=0):
    return _split_sizes(x, split_sizes, dim)


@register(aten.split.Tensor, doc="slices")
def _split(rt, info, x, split_size, dim=0):
    size, n = int(split_size), int(x.shape[dim])
    return _split_sizes(x, [min(size, n - s) for s in range(0, n, size)] or [0], dim)


@register(aten.unbind.int, doc="xp.unstack")
def _unbind(rt, info, x, dim=0):
    return list(rt.be.xp.unstack(x, axis=dim))


@register(aten.cat.default, doc="xp.concat")
def _cat(rt, info, tensors, dim=0):
    return rt.be.xp.concat(list(tensors), axis=dim)


@register(aten.stack.default, doc="xp.stack")
def _stack(rt, info, tensors, dim=0):
    return rt.be.xp.stack(list(tensors), axis=dim)


@register(aten.flip.default, doc="xp.flip")
def _flip(rt, info, x, dims):
    return rt.be.xp.flip(x, axis=tuple(dims))


@register(aten.roll.default, doc="xp.roll")
def _roll(rt, info, x, shifts, dims=()):
    return rt.be.xp.roll(x, tuple(shifts), axis=tuple(dims) or None)


@register(aten.repeat.default, doc="xp.tile")
def _repeat(rt, info, x, repeats):
    return rt.be.xp.tile(x, tuple(repeats))


# ============================================================================ as_strided


def _positions(shape, strides, offset=0) -> np.ndarray:
    """The storage position of every element of a strided view (an int64 array of ``shape``)."""
    pos = np.full(tuple(shape), offset, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(shape, strides)):
        view = [1] * len(shape)
        view[axis] = n
        pos = pos + np.arange(n, dtype=np.int64).reshape(view) * s
    return pos


def _memory_order(shape, strides):
    """The axes from the outermost to the innermost in memory, if the strides lay ``shape`` out
    densely (a permutation of a contiguous layout: channels-last, a transpose ...); else None.
    """
    order = sorted(range(len(shape)), key=lambda a: (-strides[a], -a))
    expected = 1
    for axis in reversed(order):
        if shape[axis] != 1 and strides[axis] != expected:
            return None
        expected *= shape[axis]
    return order


def _as_strided_check(node, info):
    """What ``as_strided``'s strides address, in the input's own memory layout (as export recorded
    it): the input itself, a permutation of its memory order, or (any other view inside the
    input) the positions to take.
    """
    src = node.args[0].meta.get("val")
    if not isinstance(src, torch.Tensor):
        raise Unsupported("the input's layout was not recorded")
    shape, strides = tuple(int(n) for n in src.shape), tuple(int(s) for s in src.stride())
    size, stride = [int(n) for n in node.args[1]], [int(s) for s in node.args[2]]
    offset = node.args[3] if len(node.args) > 3 else node.kwargs.get("storage_offset")
    base = int(src.storage_offset())
    offset = base if offset is None else int(offset)
    order = _memory_order(shape, strides)
    if order is None:
        raise Unsupported(f"as_strided of an input whose strides {strides} are not a dense layout of {shape}")
    numel = int(np.prod(shape))
    wanted = _positions(size, stride, offset - base)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= numel):
        raise Unsupported(
            f"as_strided reads outside its input (size {size}, stride {stride}, offset {offset})"
        )
    if size == list(shape) and np.array_equal(wanted, _positions(shape, strides)):
        info.extra["as_strided"] = ("same",)
        return
    out_order = _memory_order(size, stride)
    if out_order is not None and offset == base and wanted.size == numel:
        inverse = tuple(int(i) for i in np.argsort(out_order))
        info.extra["as_strided"] = ("permute", order, tuple(size[a] for a in out_order), inverse)
        return
    info.extra["as_strided"] = ("take", order, wanted)


@register(
    aten.as_strided.default,
    doc="the view its strides address in the input's memory layout: xp.reshape and xp.permute_dims, "
    "or xp.take of the addressed elements (overlapping windows); a non-dense input is refused",
    check=_as_strided_check,
)
def _as_strided(rt, info, x, size, stride, storage_offset=None):
    xp = rt.be.xp
    plan = info.extra["as_strided"]
    if plan[0] == "same":
        return x
    flat = xp.reshape(xp.permute_dims(x, tuple(plan[1])), (-1,))  # the elements in memory order
    if plan[0] == "permute":
        return xp.permute_dims(xp.reshape(flat, plan[2]), plan[3])
    index = rt.be.asarray(
        plan[2].reshape(-1).astype(np.int32 if flat.shape[0] < 2**31 else np.int64), **device_kw(rt)
    )
    return xp.reshape(xp.take(flat, index, axis=0), tuple(int(n) for n in size))


# ============================================================================ copies, casts, no-ops


@register(aten.clone.default, doc="x (arrays are values)")
@register(aten.alias.default, aten.lift_fresh_copy.default, doc="x")
def _identity(rt, info, x, *args, **kwargs):
    return x


@register(
    aten._to_copy.default, doc="xp.astype (a float to a narrow integer wraps, as in torch)", bounded=False
)
def _to_copy(rt, info, x, dtype=None, **_):
    return x if dtype is None else cast(rt, x, dtype)


@register(aten._assert_tensor_metadata.default, doc="nothing (a trace-time assertion)")
def _noop(rt, info, *args, **kwargs):
    return None


@register(operator.getitem, doc="an element of a multi-output operator's result")
def _getitem(rt, info, obj, index):
    return obj[index]
