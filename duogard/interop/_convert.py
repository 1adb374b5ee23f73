"""``convert``: move a pytree of arrays between JAX, PyTorch and NumPy, zero-copy where possible.

JAX <-> PyTorch goes through DLPack, passing the array *object* to the consumer's
``from_dlpack`` (never a capsule), so the consumer can hand its stream to ``__dlpack__``.
Neither framework is imported at module level: each one is imported when a leaf or the
target needs it.

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
    unless ``allow_downcast=True``, which casts explicitly (a copy). Switch 64-bit mode on
    with ``jax.config.update("jax_enable_x64", True)`` or ``JAX_ENABLE_X64=1``.

Dtypes
    bool, int8/16/32/64, uint8, float16, bfloat16, float32/64, complex64/128 round-trip
    both ways, as do 0-d and empty arrays. bfloat16 crosses between JAX and PyTorch
    directly; NumPy has no bfloat16 of its own, so ``to="numpy"`` returns an
    ``ml_dtypes.bfloat16`` array (the type JAX itself uses; zero-copy, through an int16
    view for torch) and raises ``ImportError`` if ml_dtypes is missing.

Devices
    Every array leaf has a device (NumPy arrays: the CPU). With ``device=None`` all array
    leaves must be on one device and the results stay there; leaves on different devices
    (CPU against CUDA, or two GPUs) raise ``ValueError``, as does a device the target
    framework cannot hold (NumPy holds CPU memory only; a CPU-only JAX holds no CUDA
    memory). ``device="cpu"``, ``"cuda:1"``, a ``torch.device`` or a JAX ``Device`` says
    where the results go: leaves elsewhere are moved (a copy), by the source framework
    when it can reach the target device, else by the target framework after a zero-copy
    import.

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

import sys
from typing import Any

import numpy as np
import optree

from duogard.tree import tree_flatten, tree_unflatten

__all__ = ["convert"]

TARGETS = ("jax", "torch", "numpy")
JAX_ALIGNMENT = 64  # bytes; XLA's minimum alignment for a buffer it does not copy

# 64-bit dtypes JAX shrinks when its 64-bit mode is off, and what they become
_NARROW = {"float64": "float32", "int64": "int32", "uint64": "uint32", "complex128": "complex64"}

# DLPack device types (DLDeviceType) -> duogard's device kinds
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_ROCM = 1, 2, 3, 10
_DL_KIND = {_DL_CPU: "cpu", _DL_CUDA_HOST: "cpu", _DL_CUDA: "cuda", _DL_ROCM: "cuda"}


def convert(tree: Any, to: Any, device: Any = None, *, copy: bool | None = None,
            allow_downcast: bool = False) -> Any:
    """Convert every array leaf of ``tree`` to JAX, PyTorch or NumPy, zero-copy where possible.

    Args:
      tree: a pytree (nested dicts, lists, tuples) whose leaves are JAX arrays, torch
        tensors, NumPy arrays or scalars, or Python scalars (returned unchanged).
      to: ``"jax"``, ``"torch"`` or ``"numpy"`` (or a duogard backend module).
      device: where the results go: ``None`` (stay where the leaves are, which must be one
        device), ``"cpu"``, ``"cuda"`` (``"cuda:0"``), ``"cuda:1"``, a ``torch.device`` or a
        JAX device. Leaves elsewhere are moved there (a copy).
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
    target = _target_name(to)
    if copy not in (None, True, False):
        raise TypeError(f"convert: copy must be None, True or False, got {copy!r}")
    leaves, treedef = tree_flatten(tree)
    kinds = [_kind(x, tree, i) for i, x in enumerate(leaves)]
    devices = [None if k == "scalar" else _device_of(x, k) for x, k in zip(leaves, kinds)]
    if device is None:
        dest = _common_device(devices, tree)
    else:
        dest = _parse_device(device)
    if dest is not None and not _reaches(target, dest):
        raise ValueError(_unreachable_message(target, dest, device is None))
    out = [
        x if kind == "scalar" else _convert_leaf(
            x, kind, target, src_dev, dest, copy=copy, allow_downcast=allow_downcast,
            where=lambda i=i: _path(tree, i))
        for i, (x, kind, src_dev) in enumerate(zip(leaves, kinds, devices))
    ]
    return tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- arguments

def _target_name(to) -> str:
    name = getattr(to, "framework", to)  # a backend module names its framework
    if isinstance(name, str) and name.strip().lower() in TARGETS:
        return name.strip().lower()
    raise ValueError(
        f"convert: to must be one of {list(TARGETS)} (or a backend module), got {to!r}")


def _kind(x, tree, i) -> str:
    """'numpy', 'torch', 'jax' or 'scalar' (left unchanged); TypeError for anything else."""
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    if isinstance(x, (bool, int, float, complex)):
        return "scalar"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise TypeError(
                f"convert: leaf {_path(tree, i)} is a torch tensor traced by torch.func "
                "(grad/jvp/vmap); convert concrete tensors, outside the transform")
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None:
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"convert: leaf {_path(tree, i)} is a traced JAX value ({type(x).__name__}); "
                "convert concrete arrays, outside jax.jit/grad/vmap")
        if isinstance(x, jax.Array):
            return "jax"
    raise TypeError(
        f"convert: leaf {_path(tree, i)} is a {type(x).__module__}.{type(x).__qualname__}; "
        "expected a JAX array, a torch tensor, a NumPy array or a Python scalar")


def _path(tree, i: int) -> str:
    keys = optree.tree_paths(tree)[i]
    return repr(".".join(str(k) for k in keys)) if keys else "<root>"


def _parse_device(device) -> tuple[str, int]:
    """A device argument -> ('cpu', 0) or ('cuda', index)."""
    if isinstance(device, str):
        kind, _, index = device.strip().lower().partition(":")
        kind = {"gpu": "cuda"}.get(kind, kind)
        if kind in ("cpu", "cuda") and (index == "" or index.isdigit()):
            return kind, int(index or 0) if kind == "cuda" else 0
    elif hasattr(device, "platform") and hasattr(device, "id"):  # a JAX device
        kind = {"gpu": "cuda", "rocm": "cuda"}.get(device.platform, device.platform)
        if kind in ("cpu", "cuda"):
            index = getattr(device, "local_hardware_id", None)
            return kind, 0 if kind == "cpu" else int(device.id if index is None else index)
    elif hasattr(device, "type") and hasattr(device, "index"):  # a torch.device
        if device.type in ("cpu", "cuda"):
            return device.type, 0 if device.type == "cpu" else int(device.index or 0)
    raise ValueError(
        f"convert: device must be None, 'cpu', 'cuda', 'cuda:N', a torch.device or a JAX "
        f"CPU/GPU device, got {device!r}")


def _device_of(x, kind) -> tuple[str, int]:
    if kind == "jax" and len(x.devices()) != 1:
        raise ValueError(
            f"convert: a JAX array sharded over {len(x.devices())} devices cannot be "
            "exchanged by DLPack; gather it onto one device first (jax.device_put)")
    if kind == "numpy":
        return "cpu", 0
    dl_type, index = x.__dlpack_device__()
    kind = _DL_KIND.get(int(dl_type))
    if kind is None:
        raise ValueError(f"convert: arrays on DLPack device type {dl_type!r} are not supported "
                         "(only CPU and CUDA/ROCm)")
    return kind, 0 if kind == "cpu" else int(index)


def _fmt(dev) -> str:
    return "cpu" if dev[0] == "cpu" else f"{dev[0]}:{dev[1]}"


def _common_device(devices, tree):
    seen: dict[tuple[str, int], int] = {}
    for i, dev in enumerate(devices):
        if dev is not None:
            seen.setdefault(dev, i)
    if len(seen) > 1:
        where = ", ".join(f"{_path(tree, i)} on {_fmt(dev)}" for dev, i in seen.items())
        raise ValueError(
            f"convert: the array leaves are on different devices ({where}); pass device= "
            "(e.g. device='cpu' or device='cuda:0') to say where the results go")
    return next(iter(seen), None)


# ----------------------------------------------------------------------------- devices

def _jax_device(dev):
    """The JAX device for ('cpu', 0) / ('cuda', i), or None if this JAX has none."""
    import jax

    if dev[0] == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU plugin installed
        return None
    for d in gpus:
        if getattr(d, "local_hardware_id", d.id) == dev[1]:
            return d
    return None


def _torch_device(dev):
    import torch

    return torch.device("cpu") if dev[0] == "cpu" else torch.device("cuda", dev[1])


def _reaches(framework: str, dev) -> bool:
    """Whether ``framework`` can hold memory on device ``dev``."""
    if dev[0] == "cpu":
        return True
    if framework == "numpy":
        return False
    if framework == "torch":
        import torch

        return torch.cuda.is_available() and dev[1] < torch.cuda.device_count()
    return _jax_device(dev) is not None


def _unreachable_message(target, dest, implicit) -> str:
    why = {"numpy": "NumPy arrays live in host memory",
           "jax": "this JAX has no such device (a CUDA build of JAX is needed: "
                  "pip install 'jax[cuda12]')",
           "torch": "this PyTorch has no such device (a CUDA build of PyTorch is needed)"}[target]
    hint = "; pass device='cpu' to copy the leaves to the host" if implicit else ""
    return f"convert: cannot put {target} arrays on {_fmt(dest)}: {why}{hint}"


def _move(framework: str, x, dev):
    if framework == "torch":
        return x.to(_torch_device(dev))
    if framework == "jax":
        import jax

        return jax.device_put(x, _jax_device(dev))
    raise AssertionError(f"NumPy arrays cannot be moved to {dev}")  # excluded by _reaches


# ----------------------------------------------------------------------------- one leaf

def _no_copy(where, reason: str):
    return ValueError(f"convert: leaf {where()} needs a copy ({reason}), but copy=False")


def _convert_leaf(x, src: str, target: str, src_dev, dest, *, copy, allow_downcast, where):
    fresh = False  # True once x is a new buffer that nothing else holds
    if src == "numpy":
        x = np.asarray(x)  # a NumPy scalar becomes a 0-d array
    elif src == "torch":
        x = x.detach()  # shares memory; the caller's tensor keeps requires_grad
        if x.is_conj() or x.is_neg():
            if copy is False:
                raise _no_copy(where, "a torch tensor with the lazy conjugate/negative bit")
            x, fresh = x.resolve_conj().resolve_neg(), True
    if target == "jax" and src != "jax":
        x, fresh = _fit_jax_width(x, src, copy=copy, allow_downcast=allow_downcast,
                                  where=where, fresh=fresh)

    move_after = False
    if dest is not None and dest != src_dev:
        if copy is False:
            raise _no_copy(where, f"a move from {_fmt(src_dev)} to {_fmt(dest)}")
        if src != "numpy" and _reaches(src, dest):
            x, fresh = _move(src, x, dest), True
        elif _reaches(target, src_dev):
            move_after = True  # import where it is (zero-copy), then move
        else:
            raise ValueError(f"convert: neither {src} nor {target} can move leaf {where()} "
                             f"from {_fmt(src_dev)} to {_fmt(dest)}")
    want_copy = copy is True and not fresh and not move_after

    if target == src:
        out = _copy_same(x, src) if want_copy else x
    elif target == "jax":
        out = _to_jax(x, src, copy=copy, want_copy=want_copy, where=where)
    elif target == "torch":
        out = _to_torch(x, src, copy=copy, want_copy=want_copy, where=where)
    else:
        out = _to_numpy(x, src, want_copy=want_copy)
    return _move(target, out, dest) if move_after else out


def _copy_same(x, framework):
    if framework == "torch":
        return x.clone()
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.array(x, copy=True)
    return np.array(x, copy=True)


def _dtype_name(x, src) -> str:
    return str(x.dtype).removeprefix("torch.") if src == "torch" else np.dtype(x.dtype).name


def _fit_jax_width(x, src, *, copy, allow_downcast, where, fresh):
    """Refuse (or, if allowed, perform) the 64 -> 32 bit narrowing JAX does silently."""
    import jax

    name = _dtype_name(x, src)
    if name not in _NARROW or jax.dtypes.canonicalize_dtype(np.dtype(name)) == np.dtype(name):
        return x, fresh
    narrow = _NARROW[name]
    if not allow_downcast:
        raise TypeError(
            f"convert: leaf {where()} is {name}, but JAX's 64-bit mode is off and JAX would "
            f"silently store it as {narrow}. Enable 64-bit mode "
            "(jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1 before importing "
            f"jax), or pass allow_downcast=True to cast it to {narrow} explicitly")
    if copy is False:
        raise _no_copy(where, f"a downcast from {name} to {narrow}")
    if src == "torch":
        import torch

        return x.to(getattr(torch, narrow)), True
    return x.astype(narrow), True


def _is_compact(shape, strides) -> bool:
    """Whether strides (in elements) describe a dense buffer in some dimension order.

    That is what JAX's DLPack import accepts: row-major and its transpositions, not
    strided slices or broadcasting (stride 0). Size-1 dims may have any stride; an empty
    array any strides at all.
    """
    if 0 in shape:
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(shape, strides) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _jax_layout_problem(x, src) -> str | None:
    """Why JAX cannot import ``x`` (a torch tensor or NumPy array) zero-copy, or None."""
    if src == "torch":
        shape, strides, address = tuple(x.shape), x.stride(), x.data_ptr()
    else:
        if not x.flags.writeable:
            return "a read-only NumPy array (DLPack 0.x cannot mark it read-only)"
        if x.dtype.kind not in "biufc":
            return f"NumPy dtype {x.dtype} has no DLPack code"
        if any(s % x.itemsize for s in x.strides):
            return "strides that are not a multiple of the item size"
        shape, strides, address = x.shape, [s // x.itemsize for s in x.strides], x.ctypes.data
    if not _is_compact(shape, strides):
        kind = "a broadcast view (stride 0)" if 0 in strides else "a strided view"
        return f"{kind}: JAX imports only compact layouts"
    if x.size if src == "numpy" else x.numel():
        if address % JAX_ALIGNMENT:
            return f"a buffer not aligned to {JAX_ALIGNMENT} bytes (address % {JAX_ALIGNMENT} = " \
                   f"{address % JAX_ALIGNMENT})"
    return None


def _to_jax(x, src, *, copy, want_copy, where):
    import jax.numpy as jnp

    problem = _jax_layout_problem(x, src)
    if problem is not None and copy is False:
        raise _no_copy(where, problem)
    if src == "numpy":
        if problem is not None or want_copy:
            return jnp.array(x, copy=True)
        return jnp.from_dlpack(x)
    import torch

    if problem is not None or want_copy:
        # a fresh torch buffer: dense row-major, and torch's allocator aligns it
        x = x.clone(memory_format=torch.contiguous_format)
    if copy is False:
        return jnp.from_dlpack(x, copy=False)  # JAX raises rather than copy behind our back
    try:
        return jnp.from_dlpack(x)  # passes JAX's stream to x.__dlpack__
    except Exception as exc:
        # JAX releases before 0.5 refuse transposed layouts ("non-default layout") as well
        if x.is_contiguous() or "layout" not in str(exc):
            raise
        return jnp.from_dlpack(x.contiguous())


def _to_torch(x, src, *, copy, want_copy, where):
    import torch

    if src == "jax":
        out = torch.from_dlpack(x)  # passes torch's current stream to x.__dlpack__
        return out.clone() if want_copy else out
    # NumPy source
    bf16 = x.dtype.name == "bfloat16"  # ml_dtypes: torch.from_numpy does not know it
    view = x.view(np.int16) if bf16 else x
    if not x.flags.writeable or any(s < 0 for s in x.strides):
        if copy is False:
            raise _no_copy(where, "a read-only or negatively strided NumPy array")
        view, want_copy = np.array(view, copy=True), False
    out = torch.from_numpy(view.copy() if want_copy else view)
    return out.view(torch.bfloat16) if bf16 else out


def _to_numpy(x, src, *, want_copy):
    if src == "jax":
        out = np.asarray(x)  # zero-copy on CPU, read-only; bfloat16 as ml_dtypes.bfloat16
        return np.array(out, copy=True) if want_copy else out
    # torch source (detached, on the CPU)
    import torch

    if x.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ImportError(
                "convert: to='numpy' of a bfloat16 tensor needs ml_dtypes (NumPy has no "
                "bfloat16): pip install ml_dtypes") from exc
        out = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        out = x.numpy()
    return out.copy() if want_copy else out
