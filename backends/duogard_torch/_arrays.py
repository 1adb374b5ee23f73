"""Arrays, dtypes, devices and numerics on PyTorch."""

from __future__ import annotations

import numpy as np
import torch

from duogard.backend import backend_of
from duogard.backend.authoring import native_byte_order, threads_from_env

from ._dlpack import dlpack_import

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}

# torch >= 2.9 settings (the legacy allow_tf32 flags are deprecated there and, mixed with
# the new ones, can leave cuDNN in TF32): every leaf of the fp32_precision tree, set to IEEE
_PRECISION_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def enable_float64() -> None:
    pass  # torch computes in float64 whenever asked


def _knob(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def pin_float32_precision():
    # TF32 off for cuBLAS and cuDNN (conv, RNN), and oneDNN's reduced precision on CPU
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        knobs = [_knob(p) for p in _PRECISION_KNOBS]
        saved = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"

        def restore():
            for k, value in zip(knobs, saved):
                k.fp32_precision = value

        return restore

    # older torch: the legacy flags
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    def restore_legacy():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])

    return restore_legacy


def is_array(x) -> bool:
    return isinstance(x, torch.Tensor)


def as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _DTYPES[key]
    except KeyError:
        raise TypeError(f"as_dtype: unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype) -> str:
    return str(as_dtype(dtype)).removeprefix("torch.")


def default_device():
    return torch.device("cpu")


def device_of(x):
    return x.device


def device_kind(x) -> str:
    return x.device.type


def asarray(x, dtype=None, device=None):
    dtype = as_dtype(dtype)
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            x = native_byte_order(x)  # big-endian NumPy: torch takes native byte order only
        elif not x.flags.writeable:
            x = x.copy()  # torch refuses to wrap read-only NumPy memory
        if x.dtype.name == "bfloat16":  # ml_dtypes' (to_numpy's): torch reads it through int16
            x = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
    elif not is_array(x):
        source = backend_of(x, fallback=False)
        if source is not None:
            x = dlpack_import(source.dlpack_export(x))
    return torch.as_tensor(x, dtype=dtype, device=device)


def stage(x):
    return asarray(x)


def to_numpy(x) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        # NumPy has no bfloat16: ml_dtypes' (JAX's own), through an int16 view
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ImportError(
                "to_numpy: a bfloat16 tensor needs ml_dtypes (NumPy has no bfloat16): pip install ml_dtypes"
            ) from exc
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


_DEFAULT_THREADS = torch.get_num_threads()
_SMALL_WORK = 1e8  # floating-point operations per step below which one thread is chosen


def threads_for(work: float) -> str:
    forced = threads_from_env("DUOGARD_TORCH_THREADS")  # validated: a huge count crashed torch
    if forced is not None:
        n, why = forced, "DUOGARD_TORCH_THREADS"
    elif work < _SMALL_WORK:
        n, why = 1, f"small steps, ~{work:.2g} flop"
    else:
        n, why = _DEFAULT_THREADS, f"~{work:.2g} flop per step"
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return f"torch {n} thread{'s' if n > 1 else ''} ({why})"
