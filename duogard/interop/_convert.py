"""``convert``: move a pytree of arrays between JAX, PyTorch and NumPy, zero-copy where possible.

JAX <-> PyTorch goes through DLPack, as a pair of backend ops: the source backend's
``dlpack_export`` applies its framework's rules (torch: detach, resolve lazy bits) and the
destination backend's ``dlpack_import`` applies its own (JAX: compact layouts, alignment, 64-bit
mode), passing the exported *object* to the consumer's ``from_dlpack`` (never a capsule), so
the consumer can hand its stream to ``__dlpack__``. This module orchestrates: it finds each
leaf's backend (``duogard.backend.backend_of``), checks the devices and decides which framework
moves a leaf. It imports no framework itself (a backend is loaded when a leaf or the target
needs it) and handles NumPy, which is no framework, on its own.

The default exchange (``copy=None``, no move) of plain arrays takes a fast route first: the
source backend's ``dlpack_share`` checks each leaf's own state with cheap attributes (traced,
layout, address, autograd, device) and the target's ``dlpack_importer`` is its bare
``from_dlpack``, while what depends only on a type, a dtype or a device is decided once and
kept. A tree with any other leaf takes the general route below, which alone copies and raises.

Rules
-----
The same memory, no copies (default, ``copy=None``)
    A leaf moves between frameworks without a copy whenever the layout allows; tests check
    it by comparing data pointers (``unsafe_buffer_pointer()`` against ``data_ptr()``).
    Each case below that needs a copy says so. ``copy=True`` always copies (the result
    shares memory with nothing); ``copy=False`` never copies and raises ``ValueError``
    naming the reason where a copy would be needed.

Autograd
    A torch tensor that requires grad is detached: the result shares its memory but is cut
    from the autograd graph (gradients do not flow across frameworks), and the original
    tensor still requires grad. Torch results never require grad. A tensor with the lazy
    conjugate or negative bit set is resolved first (a copy).

Strides (torch -> JAX)
    JAX imports only compact layouts: a dense row-major buffer or a permutation of one, so
    transposed and permuted views stay zero-copy. Strided slices (``t[:, ::2]``) and
    broadcast views (``expand``, stride 0) are made contiguous first: **a copy**.
    NumPy and PyTorch accept any strides, so torch -> NumPy and JAX -> anything never copy
    for this reason (JAX arrays are always dense).

Alignment (torch/NumPy -> JAX)
    JAX needs the first element 64-byte aligned; on CPU it silently copies a buffer that is
    not. duogard checks the address itself and copies such a view (``t[1:]`` of float32,
    say) before the exchange, on every device, so the rule is the same everywhere and
    ``copy=False`` can refuse it. Views whose offset is a multiple of 64 bytes stay
    zero-copy, and so does memory allocated by PyTorch (64-byte aligned). NumPy's own
    allocator aligns to 16 bytes only, so most NumPy arrays are copied into JAX.

64-bit values into JAX
    With JAX's 64-bit mode off, JAX silently turns float64/int64/uint64/complex128 into
    their 32-bit halves. duogard refuses (``TypeError`` naming the dtype and the leaf)
    unless ``allow_downcast=True``, which casts explicitly (a copy); integer values that do
    not fit the 32-bit type raise ``ValueError`` even then (a cast would wrap them). Switch
    64-bit mode on with ``duogard.backend("jax").enable_float64()``,
    ``jax.config.update("jax_enable_x64", True)`` or ``JAX_ENABLE_X64=1``.

Dtypes
    bool, int8/16/32/64, uint8/16/32/64, float16, bfloat16, float32/64, complex64/128
    round-trip both ways, as do 0-d and empty arrays. Any other dtype (NumPy strings,
    datetimes or objects, float8, quantized tensors, typed JAX PRNG keys) raises ``TypeError``
    naming the leaf and its dtype, as does a torch tensor that is not dense (sparse, nested).
    bfloat16 crosses between JAX and PyTorch directly; NumPy has no bfloat16 of its own, so
    ``to="numpy"`` returns an ``ml_dtypes.bfloat16`` array (the type JAX itself uses;
    zero-copy, through an int16 view for torch) and raises ``ImportError`` if ml_dtypes is
    missing.

Devices
    Every array leaf has a device (NumPy arrays: the CPU). JAX tells its CPU devices apart
    (``cpu:0`` and ``cpu:1`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``);
    PyTorch and NumPy hold all host memory as one device, ``cpu`` (``cpu:0``). With
    ``device=None`` all array leaves must be on one device and the results stay there; leaves
    on different devices (CPU against CUDA, two GPUs, or two JAX CPU devices) raise
    ``ValueError`` naming the leaves and asking for ``device=``, as does a device the target
    framework cannot hold (NumPy holds CPU memory only; a CPU-only JAX holds no CUDA memory;
    JAX has no ``cpu:N`` beyond its device count). ``device="cpu"``, ``"cpu:1"``,
    ``"cuda:1"``, a ``torch.device`` or a JAX ``Device`` says where the results go: leaves
    elsewhere are moved (a copy), by the source framework when it can reach the target
    device, else by the target framework after a zero-copy import. Into PyTorch or NumPy any
    ``"cpu:N"`` is their CPU: a leaf on any JAX CPU device crosses without a copy.

Streams (CUDA)
    The consumer's ``from_dlpack`` receives the array object and passes its own stream to
    the producer's ``__dlpack__(stream=...)``: ``torch.from_dlpack`` passes torch's current
    stream, ``jax.numpy.from_dlpack`` passes the stream JAX waits on for external buffers.
    The producer makes that stream wait for pending work on the buffer, so there is no race
    and no device-wide synchronisation.

Shared buffers are read-only (policy)
    A zero-copy result aliases the input. PyTorch cannot mark a tensor read-only, so a
    torch view of a JAX array is writable, and an in-place write (``t.add_(1)``) changes
    the "immutable" JAX array too. By duogard's policy shared buffers are read-only: never
    write in place into a converted array or its source; pass ``copy=True`` to get memory
    of your own. JAX -> NumPy arrays are marked read-only by NumPy; torch -> NumPy arrays
    are writable and share the tensor's memory.

Donation
    Never donate a buffer the other framework still holds: ``jax.jit(...,
    donate_argnums=...)`` on an array imported from torch (or exported to it) lets XLA
    reuse memory that the tensor still reads. Donate only arrays made with ``copy=True``.

NumPy sources and targets
    NumPy -> torch is zero-copy (``torch.from_numpy``) unless the array is read-only or has
    negative strides (a copy: torch has no read-only tensors). NumPy -> JAX is zero-copy
    only for writable, compact, 64-byte aligned arrays. ``to="numpy"`` is zero-copy from
    JAX (``np.asarray``, read-only) and from torch (``Tensor.numpy``, writable).

Other leaves
    Python scalars (bool, int, float, complex) are returned unchanged: both frameworks
    accept them as weakly typed numbers, and an array would force a dtype that differs by
    framework. A NumPy scalar becomes a 0-d array. Any other leaf raises ``TypeError``
    naming its path; so does a traced value (convert outside ``jax.jit``/``grad``/``vmap``
    and ``torch.func`` transforms: a traced value has no buffer to share).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import numpy as np
import optree

from duogard.backend import backend, backend_of, imported_backends, registered_backends
from duogard.backend.authoring import copy_refused, device_label, native_byte_order
from duogard.tree import tree_flatten, tree_unflatten

__all__ = ["convert"]

_NUMPY = "numpy"
_SCALAR = object()  # the owner of a Python scalar leaf: returned unchanged


def convert(
    tree: Any, to: Any, device: Any = None, *, copy: bool | None = None, allow_downcast: bool = False
) -> Any:
    """Convert every array leaf of ``tree`` to JAX, PyTorch or NumPy, zero-copy where possible.

    Args:
      tree: a pytree (nested dicts, lists, tuples) whose leaves are JAX arrays, torch
        tensors, NumPy arrays or scalars, or Python scalars (returned unchanged).
      to: ``"jax"``, ``"torch"`` or ``"numpy"`` (or a duogard backend module).
      device: where the results go: ``None`` (stay where the leaves are, which must be one
        device), ``"cpu"`` (``"cpu:0"``), ``"cpu:1"`` (JAX's second CPU device), ``"cuda"``
        (``"cuda:0"``), ``"cuda:1"``, a ``torch.device`` or a JAX device. Leaves elsewhere are
        moved there (a copy).
      copy: ``None`` shares memory wherever the layout allows and copies where it does
        not; ``True`` always copies; ``False`` never copies and raises ``ValueError`` where
        a copy would be needed (strided or misaligned views, device moves, downcasts).
      allow_downcast: with JAX's 64-bit mode off, cast 64-bit leaves to their 32-bit dtype
        instead of raising ``TypeError``.

    Returns:
      A pytree of the same structure, each array leaf now of the target framework.

    The rules (detach, strides, alignment, 64-bit, dtypes, devices, streams, the read-only
    policy for shared buffers, donation) are in the module docstring of
    ``duogard.interop._convert`` and in ``help(duogard.interop)``.

    Example::

        params_t = dg.convert(params_j, to="torch")     # the same memory, as tensors
        grads_j = dg.convert(grads_t, to="jax")
    """
    try:
        target = _TARGETS[to]
    except (KeyError, TypeError):  # first use of ``to`` (or an unhashable one: _target says why)
        target = _target(to)
        if isinstance(to, (str, ModuleType)):
            _TARGETS[to] = target
    if copy is None:
        out = _GENERAL if target is _NUMPY else _share_tree(tree, target, device)
        if out is not _GENERAL:
            return out
    elif copy is not True and copy is not False:
        raise TypeError(f"convert: copy must be None, True or False, got {copy!r}")
    leaves, treedef = tree_flatten(tree)
    owners = [_owner(x, tree, i) for i, x in enumerate(leaves)]
    for i, (x, owner) in enumerate(zip(leaves, owners)):
        if owner is not _SCALAR:
            _check_dtype(x, owner, lambda i=i: _path(tree, i))
    devices = [
        None if owner is _SCALAR else _device_of(x, owner, lambda i=i: _path(tree, i))
        for i, (x, owner) in enumerate(zip(leaves, owners))
    ]
    if device is None:
        dest = _common_device(devices, tree)
    else:
        dest = _parse_device(device)
    dest = _place(target, dest)
    if dest is not None and _device_problem(target, dest) is not None:
        raise ValueError(_unreachable_message(target, dest, device is None))
    out = [
        x
        if owner is _SCALAR
        else _convert_leaf(
            x,
            owner,
            target,
            src_dev,
            dest,
            copy=copy,
            allow_downcast=allow_downcast,
            where=lambda i=i: _path(tree, i),
        )
        for i, (x, owner, src_dev) in enumerate(zip(leaves, owners, devices))
    ]
    return tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- the fast route

# The default exchange of arrays that need no rule's copy (the common case: parameters, batches,
# gradients) goes the fast route; anything else, and every error, the general route below.
# What depends only on a type, a dtype or a device is decided once and kept here; what depends
# on the array itself (autograd, layout, address, device) is checked leaf by leaf by the
# source backend's dlpack_share, cheap attributes first.

_GENERAL = object()  # the fast route's answer where the general route must decide
_TARGETS: dict[Any, Any] = {}  # a ``to`` argument -> the target backend (or _NUMPY)
_OWNERS: dict[type, ModuleType] = {}  # an array type -> its backend (backend_of answers by type)
_KINDS: dict[tuple, tuple] = {}  # (array type, dtype) -> (backend, dtype name) for dtypes convert moves
_REACHABLE: dict[tuple, bool] = {}  # (backend, device) -> whether the backend holds arrays there
_PYTHON_SCALARS = frozenset((bool, int, float, complex))  # exactly these types: returned unchanged


def _share_tree(tree, target, device):
    """``tree`` converted to ``target`` by the fast route, or _GENERAL.

    The fast route takes a tree whose array leaves belong to backends other than ``target``,
    have dtypes convert moves, are shared as they are by their backend (``dlpack_share``: no
    rule needs a copy) and lie on one device that ``target`` holds (``device``, if given);
    Python scalars are returned unchanged. Nothing is imported before every leaf passes, and
    where any fails the general route starts afresh: its checks, copies and error messages stay
    the only ones.
    """
    if type(tree) in _OWNERS:  # one array: nothing to flatten, nothing to collect
        hit = _share_leaf(tree, target)
        if hit is not None and (
            (device is None and _REACHABLE.get((target, hit[2]))) or _holds(target, hit[2], device)
        ):
            return hit[0](hit[1])
        return _GENERAL
    leaves, treedef = tree_flatten(tree)
    hits = []  # (importer, obj), or None for a Python scalar
    here = None
    last = (None, None, None, None)  # the previous leaf's type, dtype, backend and importer
    for x in leaves:
        if type(x) in _PYTHON_SCALARS:
            hits.append(None)
            continue
        if type(x) is last[0] and getattr(x, "dtype", None) is last[1]:
            # the previous leaf's kind (dtypes are singletons): its answers stand
            hit = last[2].dlpack_share(x)
            if hit is None:
                return _GENERAL
            hit = (last[3], hit[0], hit[1])
        else:
            hit = _share_leaf(x, target)
            if hit is None:
                return _GENERAL
            last = (type(x), x.dtype, _KINDS[(type(x), x.dtype)][0], hit[0])
        if hit[2] != here:
            if here is not None:  # leaves on two devices: the general route names them
                return _GENERAL
            here = hit[2]
        hits.append(hit)
    if not _holds(target, here, device):
        return _GENERAL
    out = [x if hit is None else hit[0](hit[1]) for x, hit in zip(leaves, hits)]
    return tree_unflatten(treedef, out)


def _share_leaf(x, target):
    """``(importer, obj, device)`` of array leaf ``x`` on the fast route, or None."""
    try:
        kind = _KINDS.get((type(x), x.dtype)) or _learn_kind(x)
    except (AttributeError, TypeError):  # not an array, or an unhashable dtype
        return None
    if kind is None or kind[0] is target:  # NumPy, a dtype convert refuses, the same framework
        return None
    hit = kind[0].dlpack_share(x)
    if hit is None:
        return None
    # asked per leaf: JAX's answer for 64-bit dtypes follows its 64-bit mode, call by call
    importer = target.dlpack_importer(kind[1])
    return None if importer is None else (importer, hit[0], hit[1])


def _holds(target, here, device) -> bool:
    """Whether the fast route's results stay on ``here`` (None: no array leaf), where ``device``
    (if given) asks them to be and ``target`` can hold them.
    """
    if device is not None:
        try:
            if _parse_device(device) != here:  # a move (or no array leaf at all)
                return False
        except ValueError:
            return False
    if here is None:
        return True
    reachable = _REACHABLE.get((target, here))  # where the leaves are: their device is one
    if reachable is None:
        reachable = _REACHABLE[(target, here)] = _device_problem(target, _place(target, here)) is None
    return reachable


def _learn_kind(x):
    """``(backend, dtype name)`` of array ``x`` (kept for its type and dtype), or None for NumPy,
    other leaves and dtypes convert does not move.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return None
    owner = backend_of(x, fallback=False)
    if owner is None:
        return None
    _OWNERS[type(x)] = owner
    try:
        name = owner.dtype_name(x.dtype)
    except TypeError:
        return None
    if name not in SUPPORTED_DTYPES:
        return None
    kind = _KINDS[(type(x), x.dtype)] = (owner, name)
    return kind


# ----------------------------------------------------------------------------- arguments


def _target(to):
    """The target backend module, or _NUMPY."""
    if isinstance(to, ModuleType) and hasattr(to, "dlpack_import"):  # a backend module
        return to
    name = to.strip().lower() if isinstance(to, str) else None
    if name == _NUMPY:
        return _NUMPY
    if name in registered_backends():
        return backend(name)
    raise ValueError(
        f"convert: to must be one of {[*registered_backends(), _NUMPY]} (or a backend module), got {to!r}"
    )


def _owner(x, tree, i):
    """The backend that owns leaf ``x``, _NUMPY, or _SCALAR (left unchanged); TypeError for
    anything else.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return _NUMPY
    if isinstance(x, (bool, int, float, complex)):
        return _SCALAR
    owner = backend_of(x, fallback=False)
    if owner is None:
        raise TypeError(
            f"convert: leaf {_path(tree, i)} is a {type(x).__module__}.{type(x).__qualname__}; "
            "expected a JAX array, a torch tensor, a NumPy array or a Python scalar"
        )
    return owner


#: The dtypes convert moves (by name, the same on every backend).
SUPPORTED_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip

# NumPy dtype kinds with no number in them, for the error message
_NUMPY_KINDS = {"U": "strings", "S": "byte strings", "M": "datetimes", "m": "timedeltas",
                "O": "Python objects", "V": "raw or structured records"}  # fmt: skip


def _check_dtype(x, owner, where) -> None:
    """TypeError naming the leaf for a dtype convert does not move (strings, datetimes, objects,
    float8, quantized, typed JAX keys ...): the frameworks would fail without the leaf's path, or
    with an AttributeError.
    """
    kind = None
    if owner is _NUMPY:
        name = x.dtype.name
        if x.dtype.kind != "V" or name.startswith("void"):  # not an ml_dtypes type (float8 ...)
            kind = _NUMPY_KINDS.get(x.dtype.kind)
    else:
        try:
            name = owner.dtype_name(x.dtype)
        except TypeError:  # a dtype with no name of the framework's (a typed JAX key)
            name = str(x.dtype)
    if name in SUPPORTED_DTYPES:
        return
    what = f"a NumPy array of {kind} (dtype {name})" if kind else f"of dtype {name}"
    hint = (
        " (a typed JAX PRNG key: convert jax.random.key_data(key), its uint32 words)"
        if "key<" in name
        else ""
    )
    raise TypeError(
        f"convert: leaf {where()} is {what}{hint}; convert moves arrays of {', '.join(SUPPORTED_DTYPES)} only"
    )


def _name(owner) -> str:
    return _NUMPY if owner is _NUMPY else owner.name


def _path(tree, i: int) -> str:
    keys = optree.tree_paths(tree)[i]
    return repr(".".join(str(k) for k in keys)) if keys else "<root>"


def _parse_device(device) -> tuple[str, int]:
    """A device argument -> ('cpu', index) or ('cuda', index)."""
    if isinstance(device, str):
        kind, _, index = device.strip().lower().partition(":")
        kind = {"gpu": "cuda"}.get(kind, kind)
        if kind in ("cpu", "cuda") and (index == "" or index.isdigit()):
            return kind, int(index or 0)
    else:  # a framework's device object: its backend knows it (none of a framework never imported)
        for be in imported_backends():
            spec = be.exchange_device(device)
            if spec is not None:
                return spec
    raise ValueError(
        f"convert: device must be None, 'cpu', 'cpu:N', 'cuda', 'cuda:N', a torch.device or a "
        f"JAX CPU/GPU device, got {device!r}"
    )


def _device_of(x, owner, where) -> tuple[str, int]:
    return ("cpu", 0) if owner is _NUMPY else owner.dlpack_device(x, where=where)


def _common_device(devices, tree):
    seen: dict[tuple[str, int], int] = {}
    for i, dev in enumerate(devices):
        if dev is not None:
            seen.setdefault(dev, i)
    if len(seen) > 1:
        where = ", ".join(f"{_path(tree, i)} on {device_label(dev)}" for dev, i in seen.items())
        raise ValueError(
            f"convert: the array leaves are on different devices ({where}); pass device= "
            "(e.g. device='cpu' or device='cuda:0') to say where the results go"
        )
    return next(iter(seen), None)


# ----------------------------------------------------------------------------- devices


def _place(owner, dev):
    """Device ``dev`` as ``owner`` (a backend or _NUMPY) tells devices apart: NumPy and a backend
    with one host device (PyTorch) hold every CPU index in their one CPU, ``("cpu", 0)``; JAX
    keeps its CPU devices apart. None stays None.
    """
    if dev is None or dev[0] != "cpu" or not dev[1]:
        return dev
    return ("cpu", 0) if owner is _NUMPY or owner.one_host_device else dev


def _device_problem(owner, dev) -> str | None:
    """Why arrays of ``owner`` (a backend or _NUMPY) cannot live on device ``dev``, or None."""
    if owner is _NUMPY:
        # host memory is NumPy's one device: it moves nothing to a JAX CPU device of its own
        if dev[0] == "cpu":
            return None if not dev[1] else "NumPy has one CPU device"
        return "NumPy arrays live in host memory"
    return owner.device_problem(dev)


def _unreachable_message(target, dest, implicit) -> str:
    hint = "; pass device='cpu' to copy the leaves to the host" if implicit else ""
    return (
        f"convert: cannot put {_name(target)} arrays on {device_label(dest)}: "
        f"{_device_problem(target, dest)}{hint}"
    )


# ----------------------------------------------------------------------------- one leaf


def _convert_leaf(x, source, target, src_dev, dest, *, copy, allow_downcast, where):
    """One array leaf from ``source`` to ``target`` (backend modules or _NUMPY)."""
    # a move: ``dest`` (placed as the target tells devices apart) is not where the leaf is
    move = dest is not None and dest != _place(target, src_dev)
    # the source moves the leaf when it can reach dest (before the exchange), else the target
    # imports it where it is (zero-copy) and moves it then
    by_source = move and _device_problem(source, dest) is None
    if move and not by_source and _device_problem(target, src_dev) is not None:
        raise ValueError(
            f"convert: neither {_name(source)} nor {_name(target)} can move leaf "
            f"{where()} from {device_label(src_dev)} to {device_label(dest)}"
        )
    if source is _NUMPY:
        obj = np.asarray(x)  # a NumPy scalar becomes a 0-d array
        if not obj.dtype.isnative and target is not _NUMPY:  # DLPack takes native byte order only
            if copy is False:
                raise copy_refused(where, f"it is in non-native byte order ({obj.dtype.str})")
            obj = native_byte_order(obj)
    else:
        obj = source.dlpack_export(
            x, copy=False if copy is False else None, device=dest if by_source else None, where=where
        )
    if target is _NUMPY:
        return _to_numpy(obj, source, copy=copy)
    return target.dlpack_import(
        obj,
        copy=copy,
        device=dest if move and not by_source else None,
        allow_downcast=allow_downcast,
        where=where,
    )


def _to_numpy(obj, source, *, copy):
    """NumPy's view of an exported array (on the host), or of a NumPy array."""
    if source is _NUMPY:
        return np.array(obj, copy=True) if copy is True else obj
    if obj.dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        # NumPy has no bfloat16 of its own: the result is an ml_dtypes.bfloat16 array
        raise ImportError(
            "convert: to='numpy' of a bfloat16 tensor needs ml_dtypes (NumPy has no "
            "bfloat16): pip install ml_dtypes"
        )
    out = source.to_numpy(obj.array)  # zero-copy on the host (read-only from JAX)
    return np.array(out, copy=True) if copy is True and not obj.fresh else out
