"""The DLPack exchange on JAX: export, import with JAX's rules, devices."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from duogard.backend.authoring import (
    SHARE_ALIGNMENT,
    ExportedArray,
    copy_refused,
    device_spec,
    leaf_name,
    plan_move,
)

JAX_ALIGNMENT = SHARE_ALIGNMENT  # bytes; XLA's minimum alignment for a buffer it does not copy

# 64-bit dtypes JAX shrinks when its 64-bit mode is off, and what they become
_NARROW = {"float64": "float32", "int64": "int32", "uint64": "uint32", "complex128": "complex64"}


def _jax_device(device):
    """The JAX device for ``("cpu", i)`` / ``("cuda", i)``, or None if this JAX has none."""
    if device[0] == "cpu":
        cpus = jax.local_devices(backend="cpu")
        return cpus[device[1]] if 0 <= device[1] < len(cpus) else None
    try:
        gpus = jax.local_devices(backend="gpu")
    except RuntimeError:  # no GPU plugin installed
        return None
    for d in gpus:
        if getattr(d, "local_hardware_id", d.id) == device[1]:
            return d
    return None


def cpu_index(device) -> int | None:
    """The position of JAX CPU device ``device`` among this process's CPU devices (the exchange's
    ``("cpu", i)``), or None for a device of another process. DLPack names every JAX CPU device
    CPU 0, so the exchange asks JAX itself.
    """
    try:
        return jax.local_devices(backend="cpu").index(device)
    except ValueError:
        return None


def _spec(x) -> tuple[str, int]:
    """Where single-device array ``x`` is, as the exchange names it (its CPU device's index too)."""
    spec = device_spec(x.__dlpack_device__())
    if spec[0] == "cpu":
        index = cpu_index(next(iter(x.devices())))
        spec = ("cpu", 0 if index is None else index)
    return spec


def dlpack_device(x, *, where=None):
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"convert: leaf {leaf_name(where)} is a traced JAX value ({type(x).__name__}); "
            "convert concrete arrays, outside jax.jit/grad/vmap"
        )
    if len(x.devices()) != 1:
        raise ValueError(
            f"convert: a JAX array sharded over {len(x.devices())} devices cannot be "
            "exchanged by DLPack; gather it onto one device first (jax.device_put)"
        )
    return _spec(x)


def device_problem(device):
    if device[0] == "cpu" and _jax_device(device) is None:
        count = len(jax.local_devices(backend="cpu"))
        return (
            f"this JAX has {count} CPU device{'s' if count != 1 else ''} (cpu:0 to cpu:{count - 1}); "
            "more need XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
        )
    if _jax_device(device) is None:
        return "this JAX has no such device (a CUDA build of JAX is needed: pip install 'jax[cuda12]')"
    return None


def dlpack_export(x, *, copy=None, device=None, dtype=None, where=None):
    # JAX arrays are immutable and dense, with no autograd state: no rule of their own
    here, fresh = dlpack_device(x, where=where), False
    if plan_move(here, device, copy=copy, where=where):
        x, here, fresh = jax.device_put(x, _jax_device(device)), tuple(device), True
    if dtype is not None and jnp.dtype(dtype) != x.dtype:
        if copy is False:
            raise copy_refused(where, f"a cast from {x.dtype.name} to {jnp.dtype(dtype).name}")
        x, fresh = x.astype(dtype), True
    if copy is True and not fresh:
        x, fresh = jnp.array(x, copy=True), True
    strides = tuple(int(np.prod(x.shape[i + 1 :], dtype=np.int64)) for i in range(x.ndim))
    return ExportedArray(
        x,
        sys.modules[__package__],
        x.dtype.name,
        tuple(x.shape),
        strides,
        here,
        fresh,
        x.unsafe_buffer_pointer if x.size else lambda: 0,
    )


# dlpack_share's decisions: per array type (concrete or traced), per sharding (its device, or
# None for several devices); a sharding is a small value object that many arrays share
_CONCRETE: dict[type, bool] = {}
_SHARDING_DEVICE: dict = {}


def dlpack_share(x):
    concrete = _CONCRETE.get(type(x))
    if concrete is None:
        concrete = _CONCRETE[type(x)] = not issubclass(type(x), jax.core.Tracer)
    if not concrete or x.is_deleted():
        return None
    sharding = x.sharding
    here = _SHARDING_DEVICE.get(sharding, False)
    if here is False:
        try:
            here = None if len(sharding.device_set) != 1 else _spec(x)
        except (ValueError, BufferError):  # a device DLPack does not name: the general route says so
            here = None
        if len(_SHARDING_DEVICE) >= 64:
            _SHARDING_DEVICE.clear()
        _SHARDING_DEVICE[sharding] = here
    # dense, and XLA aligns its buffers: nothing else to check
    return None if here is None else (x, here)


def dlpack_importer(dtype):
    if dtype in _NARROW and not _keeps_width(dtype):
        return None  # 64-bit mode off: the general route refuses (or casts) with the leaf's name
    return jax.dlpack.from_dlpack


def dlpack_import(obj, *, copy=None, device=None, allow_downcast=False, where=None):
    host = isinstance(obj, np.ndarray)  # NumPy memory; else an ExportedArray
    own = not host and isinstance(obj.array, jax.Array)  # exported by this backend: nothing crosses
    fresh = not host and obj.fresh
    if not own:
        obj, fresh = _fit_width(obj, host, fresh, copy=copy, allow_downcast=allow_downcast, where=where)
    moving = plan_move(("cpu", 0) if host else obj.device, device, copy=copy, where=where)
    want_copy = copy is True and not fresh and not moving
    if own:
        out = jnp.array(obj.array, copy=True) if want_copy else obj.array
    elif host:
        out = _from_numpy(obj, copy=copy, want_copy=want_copy, where=where)
    else:
        out = _from_exported(obj, copy=copy, want_copy=want_copy, where=where)
    return jax.device_put(out, _jax_device(device)) if moving else out


def _fit_width(obj, host, fresh, *, copy, allow_downcast, where):
    """Refuse (or, if allowed, perform) the 64 -> 32 bit narrowing JAX does silently."""
    name = obj.dtype.name if host else obj.dtype
    if name not in _NARROW or _keeps_width(name):
        return obj, fresh
    narrow = _NARROW[name]
    if not allow_downcast:
        raise TypeError(
            f"convert: leaf {leaf_name(where)} is {name}, but JAX's 64-bit mode is off and JAX would "
            f"silently store it as {narrow}. Enable 64-bit mode "
            "(jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1 before importing "
            f"jax), or pass allow_downcast=True to cast it to {narrow} explicitly"
        )
    _check_fits(obj, host, name, narrow, where)
    if copy is False:
        raise copy_refused(where, f"a downcast from {name} to {narrow}")
    # the source framework casts (a copy)
    return (obj.astype(narrow) if host else obj.copy(dtype=narrow)), True


def _keeps_width(name) -> bool:
    """Whether JAX stores dtype ``name`` as it is now (64-bit dtypes: only in 64-bit mode)."""
    return jax.dtypes.canonicalize_dtype(np.dtype(name)) == np.dtype(name)


def _check_fits(obj, host, name, narrow, where) -> None:
    """ValueError for integers outside the narrow type's range: the cast would wrap them (2**40 -> 0)."""
    if np.dtype(name).kind not in "iu" or not obj.size:
        return
    if host:
        lo, hi = int(obj.min()), int(obj.max())
    else:  # the source framework reduces (its array may be on a GPU)
        xp = obj.backend.xp
        lo, hi = int(xp.min(obj.array)), int(xp.max(obj.array))
    info = np.iinfo(narrow)
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"convert: leaf {leaf_name(where)} holds {name} values in [{lo}, {hi}], outside the "
            f"{narrow} range [{info.min}, {info.max}]: allow_downcast=True would wrap them around. "
            "Enable JAX's 64-bit mode (jax.config.update('jax_enable_x64', True)) to keep them"
        )


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


def _is_row_major(shape, strides) -> bool:
    if 0 in shape:
        return True
    expected = 1
    for size, stride in reversed(tuple(zip(shape, strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _layout_problem(shape, strides, address, size) -> str | None:
    """Why JAX cannot import a buffer zero-copy, or None."""
    if not _is_compact(shape, strides):
        kind = "a broadcast view (stride 0)" if 0 in strides else "a strided view"
        return f"{kind}: JAX imports only compact layouts"
    if size and address % JAX_ALIGNMENT:
        return (
            f"a buffer not aligned to {JAX_ALIGNMENT} bytes (address % {JAX_ALIGNMENT} = "
            f"{address % JAX_ALIGNMENT})"
        )
    return None


def _numpy_problem(x) -> str | None:
    if not x.flags.writeable:
        return "a read-only NumPy array (DLPack 0.x cannot mark it read-only)"
    if x.dtype.kind not in "biufc":
        return f"NumPy dtype {x.dtype} has no DLPack code"
    if any(s % x.itemsize for s in x.strides):
        return "strides that are not a multiple of the item size"
    return _layout_problem(x.shape, [s // x.itemsize for s in x.strides], x.ctypes.data, x.size)


def _from_numpy(x, *, copy, want_copy, where):
    problem = _numpy_problem(x)
    if problem is not None and copy is False:
        raise copy_refused(where, problem)
    if problem is not None or want_copy:
        return jnp.array(x, copy=True)
    return jnp.from_dlpack(x)


def _from_exported(obj, *, copy, want_copy, where):
    problem = _layout_problem(obj.shape, obj.strides, obj.address, obj.size)
    if problem is not None and copy is False:
        raise copy_refused(where, problem)
    if problem is not None or want_copy:
        obj = obj.copy()  # a fresh buffer from the source framework: dense row-major, aligned
    if copy is False:
        return jnp.from_dlpack(obj, copy=False)  # JAX raises rather than copy behind our back
    try:
        return jnp.from_dlpack(obj)  # passes JAX's stream to obj.__dlpack__
    except Exception as exc:
        # JAX releases before 0.5 refuse transposed layouts ("non-default layout") as well
        if _is_row_major(obj.shape, obj.strides) or "layout" not in str(exc):
            raise
        return jnp.from_dlpack(obj.copy())
