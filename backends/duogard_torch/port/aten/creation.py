"""Creation: ``full`` and the filled copies (``*_like``, ``fill``), ``arange``, uninitialised
tensors, ``scalar_tensor``, and ``copy`` into an existing tensor's shape and dtype.
"""

from __future__ import annotations

import torch

from ..helpers import Unsupported, cast, device_kw, dtype_of
from ..registry import AtenRule, RuleTable

__all__ = ["RULES"]

aten = torch.ops.aten
RULES = RuleTable("creation", AtenRule, bounded=True)
register = RULES.register


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


@register(aten.full.default, doc="xp.full", check=_creation_check)
def _full_rule(rt, info, size, fill_value, dtype=None, **_):
    return _full(rt, size, fill_value, dtype)


@register(aten.full_like.default, doc="xp.full")
def _full_like(rt, info, x, fill_value, dtype=None, **_):
    return _full(rt, x.shape, fill_value, dtype or _torch_dtype(x))


@register(aten.zeros_like.default, doc="xp.full")
def _zeros_like(rt, info, x, dtype=None, **_):
    return _full(rt, x.shape, 0, dtype or _torch_dtype(x))


@register(aten.ones_like.default, doc="xp.full")
def _ones_like(rt, info, x, dtype=None, **_):
    return _full(rt, x.shape, 1, dtype or _torch_dtype(x))


@register(aten.fill.Scalar, doc="xp.full")
def _fill(rt, info, x, value):
    return _full(rt, x.shape, value, _torch_dtype(x))


@register(aten.scalar_tensor.default, doc="xp.full", check=_creation_check)
def _scalar_tensor(rt, info, s, dtype=None, **_):
    return _full(rt, (), s, dtype)


def _arange(rt, info, start, end=None, step=1, dtype=None, **_):
    if dtype is None:
        dtype = torch.float32 if any(isinstance(v, float) for v in (start, end, step)) else torch.int64
    return rt.be.xp.arange(start, end, step, dtype=dtype_of(rt.be, dtype), **device_kw(rt))


RULES.add(aten.arange.start_step, _arange, doc="xp.arange", check=_creation_check)


@register(aten.arange.start, doc="xp.arange")
def _arange_start(rt, info, start, end, dtype=None, **kw):
    return _arange(rt, info, start, end, 1, dtype)


@register(aten.arange.default, doc="xp.arange")
def _arange_end(rt, info, end, dtype=None, **kw):
    return _arange(rt, info, 0, end, 1, dtype)


_EMPTY = "xp.full(0) (an uninitialised tensor, written before read)"


@register(aten.empty.memory_format, doc=_EMPTY)
def _empty(rt, info, size, *args, dtype=None, **kwargs):
    return _full(rt, size, 0, dtype if dtype is not None else torch.float32)


@register(aten.empty_strided.default, doc=_EMPTY)
def _empty_strided(rt, info, size, stride, dtype=None, **kw):
    return _empty(rt, info, size, dtype=dtype)


@register(aten.empty_permuted.default, doc=_EMPTY)
def _empty_permuted(rt, info, size, physical_layout, dtype=None, **kw):
    return _empty(rt, info, size, dtype=dtype)


@register(aten.copy.default, doc="xp.broadcast_to, xp.astype (as torch casts)", bounded=False)
def _copy(rt, info, x, src, non_blocking=False):
    return cast(rt, rt.be.xp.broadcast_to(src, tuple(x.shape)), x.dtype)
