"""What the lowering's modules share: the refusal signal, argument normalisation, dtypes, the
few array helpers several operator families use, and how nodes and errors are described.

It imports no rule module (:mod:`.aten`, :mod:`.rules`) and no lowering (:mod:`.export`,
:mod:`.lower`): every one of them imports it. A helper used by two modules lives here, public.
"""

from __future__ import annotations

import operator
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F

__all__ = [
    "OpaqueFunction",
    "Unsupported",
    "UnsupportedTorchOpsError",
    "as_result_dtype",
    "as_tuple",
    "axis_of",
    "cast",
    "channel_view",
    "describe",
    "device_kw",
    "dtype_of",
    "in_mode",
    "module_path",
    "module_path_root",
    "pad_constant",
    "pair",
    "real_cause",
    "slice_axis",
    "static",
    "training_key",
]

_TORCH_DIR = str(Path(torch.__file__).parent)
_PORT_DIR = str(Path(__file__).parent)


@contextmanager
def in_mode(module, train: bool):
    """``module`` in training (or eval) mode inside the block, and afterwards every submodule in
    its own mode again: a submodule in eval mode inside a root in training mode (a wrapper
    around ``model.eval()``) stays in eval mode, where ``module.train(was_training)`` would
    switch it (and its dropout) on.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


class Unsupported(Exception):  # noqa: N818 - a signal between rule builders and the lowerings
    """Raised by a rule or its check: this node cannot be lowered (the message says why)."""


class UnsupportedTorchOpsError(NotImplementedError):
    """The module's graph uses ops duogard cannot lower; ``.ops`` lists every one of them.

    Attributes:
        ops: one ``(node name, op, module path, reason)`` tuple per unsupported node.

    ``note`` (optional) is appended to the message (the torch.fx fallback says why export
    was not used).
    """

    def __init__(self, module_name: str, ops: list[tuple[str, str, str, str]], note: str | None = None):
        self.ops = ops
        lines = [
            f"  - node {name!r}: {op} in module {path}" + (f" ({reason})" if reason else "")
            for name, op, path, reason in ops
        ]
        super().__init__(
            f"from_torch: cannot lower {len(ops)} op(s) of {module_name} to duogard's ops "
            "(needed to run it on a non-torch backend):\n"
            + "\n".join(lines)
            + "\nRewrite them with supported ops, or run the model on the torch backend "
            "(torch tensors use torch.func.functional_call and need no lowering)."
            + (f"\n{note}" if note else "")
        )


# ============================================================================ arguments


def pair(v) -> tuple[int, int]:
    """An int or a pair of ints as a pair (``kernel_size=3`` is ``(3, 3)``)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def as_tuple(v, n: int) -> tuple:
    """An int, or a sequence of one or ``n`` ints, as ``n`` ints (``stride=2`` is ``(2, 2)``)."""
    if isinstance(v, int):
        return (int(v),) * n
    v = tuple(int(s) for s in v)
    return v * n if len(v) == 1 else v


def static(value, what: str):
    """A trace-time constant argument (an fx Node here means it depends on data)."""
    if isinstance(value, torch.fx.Node):
        raise Unsupported(f"{what} must be a constant, not computed from tensors")
    return value


def axis_of(dim, ndim):
    """A torch ``dim`` argument (int, list, None or []) as an array-API ``axis``."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    if isinstance(dim, (list, tuple)):
        return tuple(d % ndim if ndim else 0 for d in dim)
    return dim % ndim if ndim else 0


# ============================================================================ dtypes, devices

_DTYPE_CACHE: dict = {}


def dtype_of(be, torch_dtype):
    """The backend's dtype for a torch dtype (JAX without 64-bit mode: the 32-bit one)."""
    if torch_dtype is None:
        return None
    name = str(torch_dtype).removeprefix("torch.")
    cache_key = (be.name, name)
    if cache_key not in _DTYPE_CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _DTYPE_CACHE[cache_key] = be.xp.zeros((), dtype=be.as_dtype(name)).dtype
    return _DTYPE_CACHE[cache_key]


def _is_float(torch_dtype) -> bool:
    return torch_dtype is not None and (torch_dtype.is_floating_point or torch_dtype.is_complex)


def as_result_dtype(rt, info, *values):
    """``values`` with their arrays cast to the node's floating result dtype (``info.dtype``).

    torch computes an elementwise operator in the dtype its type promotion gives: an integer
    tensor times a Python float, an integer over an integer, ``sqrt`` of an integer are float32
    (torch's default dtype), where the array API gives float64 or float16. Integer and bool
    results, and nodes without a recorded dtype, keep their values as they are.
    """
    if not _is_float(info.dtype):
        return values if len(values) != 1 else values[0]
    target = dtype_of(rt.be, info.dtype)
    out = tuple(
        rt.be.xp.astype(v, target) if hasattr(v, "dtype") and hasattr(v, "shape") and v.dtype != target else v
        for v in values
    )
    return out if len(out) != 1 else out[0]


_WRAPPED_INTS = ("int8", "uint8", "int16", "uint16")


def cast(rt, x, dtype):
    """``x.to(dtype)`` as torch computes it (``dtype``: a torch dtype or the backend's).

    A floating value cast to a narrow integer type wraps (torch truncates toward zero to a
    32-bit integer, then keeps the low bits: ``-3.7 -> uint8`` is 253, ``300 -> int8`` is 44),
    where the array API saturates. Beyond the 32-bit range the result is the platform's (as in
    torch); within it the two agree.
    """
    xp = rt.be.xp
    name = str(dtype).removeprefix("torch.")
    target = dtype_of(rt.be, getattr(torch, name))
    if name in _WRAPPED_INTS and "float" in str(x.dtype):
        x = xp.astype(xp.astype(x, dtype_of(rt.be, torch.int32)), target)
    return x if x.dtype == target else xp.astype(x, target)


def device_kw(rt) -> dict:
    """``device=`` for creation ops: ``x``'s device (none under a JAX transform)."""
    return {} if rt.device is None else {"device": rt.device}


def training_key(be, key, index: int, what: str):
    """The key of a lowered graph's ``index``-th random op (dropout): ``fold_in(key, index)``;
    training mode without a key is an error naming ``what`` and how to pass one.
    """
    if key is None:
        raise ValueError(
            f"{what} in training mode needs an explicit random key: "
            "model.apply(params, x, train=True, key=be.key(seed))"
        )
    return be.fold_in(key, index)


# ============================================================================ arrays


def slice_axis(x, dim, start=None, end=None, step=1):
    """``x[..., start:end:step, ...]`` along ``dim``."""
    index = [slice(None)] * x.ndim
    index[dim % x.ndim] = slice(start, end, step)
    return x[tuple(index)]


def pad_constant(rt, x, pad, value=0.0):
    """Torch's constant padding (``F.pad``'s ``pad``: last axis first; negative widths crop)."""
    xp = rt.be.xp
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        left, right = int(pad[2 * i]), int(pad[2 * i + 1])
        if left < 0:
            x, left = slice_axis(x, axis, -left, None), 0
        if right < 0:
            x, right = slice_axis(x, axis, 0, int(x.shape[axis]) + right), 0
        parts = []
        for width in (left, right):
            shape = list(x.shape)
            shape[axis] = width
            parts.append(xp.full(tuple(shape), value, dtype=x.dtype, **device_kw(rt)) if width else None)
        x = xp.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)
    return x


def channel_view(xp, v, ndim):
    """A per-channel vector shaped to broadcast over ``(N, C, ...)``."""
    return xp.reshape(v, (1, -1) + (1,) * (ndim - 2))


# ============================================================================ describing nodes


class OpaqueFunction:
    """A ``torch.autograd.Function`` call kept as one fx graph node (never lowered)."""

    def __init__(self, cls):
        self.cls = cls
        self.__name__ = f"{cls.__name__}.apply"
        self.__qualname__ = self.__name__
        self.__module__ = cls.__module__

    def __call__(self, *args, **kwargs):
        return self.cls.apply(*args, **kwargs)


def describe(target) -> str:
    """A readable name for an fx call target: ``torch.sort``, ``torch.nn.functional.gelu`` ..."""
    if isinstance(target, str):
        return target
    if isinstance(target, OpaqueFunction):
        return f"custom torch.autograd.Function {target.cls.__module__}.{target.cls.__qualname__}"
    for prefix, namespace in (
        ("torch.nn.functional", F),
        ("torch", torch),
        ("torch.fft", torch.fft),
        ("torch.linalg", torch.linalg),
        ("torch.special", torch.special),
        ("operator", operator),
    ):
        name = getattr(target, "__name__", None)
        for candidate in (name, name and name.split("_", 1)[-1]):
            if candidate and getattr(namespace, candidate, None) is target:
                return f"{prefix}.{candidate}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{mod}.{name}" if mod else name


def module_path_root(module) -> str:
    """How an error names the root module: ``'' (Net, the root)``."""
    return f"'' ({type(module).__name__}, the root)"


def module_path(node, root) -> str:
    """The module path of an fx node: ``'enc.inner' (_Inner)``, or the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        path = node.target
    elif stack:
        path = list(stack.values())[-1][0]
    else:
        return module_path_root(root)
    try:
        cls = type(root.get_submodule(path)).__name__
    except AttributeError:
        cls = "?"
    return f"{path!r} ({cls})"


def real_cause(exc: BaseException) -> str:
    """``Type: first line of the message (at file:line in function: code)``, the location being
    the innermost frame of the user's code (outside torch and duogard's port).
    """
    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    where = None
    for frame in traceback.extract_tb(exc.__traceback__):
        name = frame.filename
        if name.startswith((_TORCH_DIR, _PORT_DIR)) or "site-packages" in name or name.startswith("<"):
            continue
        where = frame
    text = f"{type(exc).__name__}: {message}"
    if where is not None:
        text += f" (at {where.filename}:{where.lineno} in {where.name}: {(where.line or '').strip()})"
    return text
