"""Arrays, dtypes, devices and numerics on JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duogard.backend import backend_of
from duogard.backend.authoring import native_byte_order

from ._dlpack import dlpack_import


def enable_float64() -> None:
    jax.config.update("jax_enable_x64", True)


def pin_float32_precision():
    saved = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    return lambda: jax.config.update("jax_default_matmul_precision", saved)


def threads_for(work: float) -> str:
    return "XLA thread pool"  # XLA sizes its own pool; a busy neighbour costs it little


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer))


def as_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = {"bfloat16": jnp.bfloat16}.get(dtype, dtype)
    return jnp.dtype(dtype)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def default_device():
    # this process's own device: in a multi-process run jax.devices() lists every process's
    return jax.local_devices()[0]


def resolve_device(device):
    """A device argument (``"cuda:1"``, a JAX device, None) as a JAX device or None."""
    if device is None or not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    return jax.local_devices(backend=kind)[int(index or 0)]


def device_of(x):
    if isinstance(x, jax.core.Tracer):
        return None  # placement is decided by the jit/vmap around a tracer
    return next(iter(x.devices()))


def device_kind(x) -> str:
    # JAX calls CUDA devices "gpu"
    platform = device_of(x).platform
    return "cuda" if platform == "gpu" else platform


def asarray(x, dtype=None, device=None):
    dtype = as_dtype(dtype)
    x = native_byte_order(x)  # big-endian NumPy: a native copy
    source = None if is_array(x) or isinstance(x, np.ndarray) else backend_of(x, fallback=False)
    if source is not None:
        # asking for a narrower dtype is an explicit downcast: let the import allow it
        x = dlpack_import(source.dlpack_export(x), allow_downcast=dtype is not None and dtype.itemsize < 8)
    if dtype is not None and dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise TypeError(
            f"asarray: dtype {dtype.name} needs JAX 64-bit mode "
            "(jax.config.update('jax_enable_x64', True)); JAX would silently use 32 bits"
        )
    out = jnp.asarray(x, dtype=dtype)
    if device is not None:
        out = jax.device_put(out, resolve_device(device))
    return out


def stage(x):
    return native_byte_order(x) if isinstance(x, np.ndarray) else asarray(x)


def to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
