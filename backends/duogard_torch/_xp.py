"""The Array API namespace of the torch backend (``Backend.xp``): ``array_api_compat.torch``, with
the calls duogard's rules and losses make on every step sent straight to torch where they mean
the same.

``array_api_compat`` makes torch follow the Array API standard (type promotion, ``copy=``,
integer sums in int64, scalars as tensors of the other operand's dtype) in Python around each
call: a few microseconds a call, and a small model's step makes dozens of them (17 reshapes in a
forward-gradient step of a two-layer MLP), ~0.1 ms a step in all. Here each such function first
checks that its arguments are the common case, in which torch's own function gives the same
result (two tensors of one dtype, a float reduction, a reshape without ``copy=``), and calls
torch directly; any other call goes to ``array_api_compat``, unchanged. Every other name is
``array_api_compat.torch``'s. A test checks each fast path against ``array_api_compat`` on the
cases it takes and the cases it passes on.
"""

from __future__ import annotations

import types

import array_api_compat.torch as _compat
import torch

__all__ = ["xp"]


class _Namespace(types.ModuleType):
    def __getattr__(self, name):  # every other name: array_api_compat's, cached
        value = getattr(_compat, name)
        setattr(self, name, value)
        return value


xp = _Namespace("duogard_torch.xp", __doc__)
xp.__file__ = __file__
_Tensor = torch.Tensor


def _same(a, b) -> bool:
    return type(a) is _Tensor and type(b) is _Tensor and a.dtype == b.dtype


def _binary(name: str, op):
    slow = getattr(_compat, name)

    def f(x1, x2, /):
        return op(x1, x2) if _same(x1, x2) else slow(x1, x2)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"``{name}``: torch's own for two tensors of one dtype, else array_api_compat's."
    return f


for _name, _op in {
    "add": torch.add,
    "subtract": torch.sub,
    "multiply": torch.mul,
    "divide": torch.div,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "less": torch.lt,
    "less_equal": torch.le,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
}.items():
    setattr(xp, _name, _binary(_name, _op))


def matmul(x1, x2, /):
    """Torch's own for two tensors of one dtype, else array_api_compat's (type promotion)."""
    return torch.matmul(x1, x2) if _same(x1, x2) else _compat.matmul(x1, x2)


def matrix_transpose(x, /):
    """The last two axes swapped (a view), as array_api_compat's."""
    if type(x) is _Tensor and x.ndim >= 2:
        return torch.transpose(x, -2, -1)
    return _compat.matrix_transpose(x)


def reshape(x, /, shape, copy=None):
    """Torch's own without ``copy=``, else array_api_compat's."""
    return (
        torch.reshape(x, shape)
        if copy is None and type(x) is _Tensor
        else _compat.reshape(x, shape, copy=copy)
    )


def astype(x, dtype, /, *, copy=True, device=None):
    """``x.to(dtype)`` for a new dtype on the same device (a new tensor either way), else
    array_api_compat's (a same-dtype ``copy=True`` must copy).
    """
    if device is None and type(x) is _Tensor and x.dtype != dtype and isinstance(dtype, torch.dtype):
        return x.to(dtype)
    return _compat.astype(x, dtype, copy=copy, device=device)


def expand_dims(x, /, axis=0):
    """``torch.unsqueeze`` for one integer axis in range (the same meaning), else array_api_compat's."""
    if type(x) is _Tensor and type(axis) is int and -x.ndim - 1 <= axis <= x.ndim:
        return torch.unsqueeze(x, axis)
    return _compat.expand_dims(x, axis=axis)


def _float_axes(x, axis) -> bool:
    """Whether a reduction over ``axis`` of ``x`` is torch's own: a float tensor, and an int or a
    non-empty tuple of distinct ints in range (None and () differ between the two).
    """
    if type(x) is not _Tensor or not x.dtype.is_floating_point:
        return False
    axes = (axis,) if type(axis) is int else axis
    if type(axes) is not tuple or not axes or not all(type(a) is int and -x.ndim <= a < x.ndim for a in axes):
        return False
    return len({a % x.ndim for a in axes}) == len(axes)


def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 - the Array API's name
    """Torch's own over float axes without ``dtype``, or of every element of a float tensor,
    else array_api_compat's (integer sums in int64, ``axis=()``).
    """
    if dtype is None and _float_axes(x, axis):
        return torch.sum(x, dim=axis, keepdim=keepdims)
    if dtype is None and axis is None and not keepdims and type(x) is _Tensor and x.dtype.is_floating_point:
        return torch.sum(x)
    return _compat.sum(x, axis=axis, dtype=dtype, keepdims=keepdims)


def mean(x, /, *, axis=None, keepdims=False):
    """Torch's own over float axes, or of every element of a float tensor, else array_api_compat's."""
    if _float_axes(x, axis):
        return torch.mean(x, dim=axis, keepdim=keepdims)
    if axis is None and not keepdims and type(x) is _Tensor and x.dtype.is_floating_point:
        return torch.mean(x)
    return _compat.mean(x, axis=axis, keepdims=keepdims)


def where(condition, x1, x2, /):
    """Torch's own for a bool tensor and two tensors of one dtype, else array_api_compat's."""
    if _same(x1, x2) and type(condition) is _Tensor and condition.dtype == torch.bool:
        return torch.where(condition, x1, x2)
    return _compat.where(condition, x1, x2)


for _f in (matmul, matrix_transpose, reshape, astype, expand_dims, sum, mean, where):
    setattr(xp, _f.__name__, _f)
