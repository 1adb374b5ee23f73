"""JAX and PyTorch on one CUDA GPU: memory preallocation and matmul precision.

Rules
-----
Preallocation
    JAX reserves 75% of GPU memory when its GPU backend starts, leaving PyTorch little.
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` makes JAX allocate on demand; it is read once,
    when JAX first initialises its backends (the first device query or computation, not
    ``import jax``). Importing duogard's JAX backend sets it by default (opt out with
    ``DUOGARD_SHARED_GPU=0``); :func:`configure_shared_gpu` sets it explicitly, for scripts
    that use JAX before asking duogard for a backend. A value the user set is kept.

TF32
    On Ampere and later GPUs JAX computes float32 matmuls and convolutions in TF32 by
    default; PyTorch does not for matmuls but does for cuDNN convolutions. Parity runs pin
    both to full float32 with :func:`pin_matmul_precision`, which restores the previous
    settings on exit. On CPU the settings change nothing measurable (oneDNN may use
    reduced precision on some CPUs; it is pinned too).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from duogard.backend import available_backends, backend, imported_backends

__all__ = ["configure_shared_gpu", "pin_matmul_precision"]

PREALLOCATE_VAR = "XLA_PYTHON_CLIENT_PREALLOCATE"


def _preallocation_fixed() -> list[str]:
    """The backends whose framework has already read its preallocation setting (each says,
    :meth:`Backend.gpu_preallocation_fixed`; a framework never imported has read nothing).
    """
    return [be.name for be in imported_backends() if be.gpu_preallocation_fixed()]


def configure_shared_gpu(*, preallocate: bool = False) -> str:
    """Set ``XLA_PYTHON_CLIENT_PREALLOCATE`` so JAX and PyTorch can share one GPU.

    Call it before the first JAX computation. A value already in the environment (the
    user's) is kept and returned. If JAX's backends have already started, the variable
    is still set (for child processes) but a ``RuntimeWarning`` says it no longer affects
    this process (each imported backend says whether its framework has read it:
    :meth:`~duogard.backend.Backend.gpu_preallocation_fixed`).

    Args:
      preallocate: the value to set when the user has set none: ``False`` (the default)
        lets JAX allocate GPU memory on demand.

    Returns:
      The value of ``XLA_PYTHON_CLIENT_PREALLOCATE`` now in force (``"false"``/``"true"``
      or the user's value).
    """
    if PREALLOCATE_VAR in os.environ:
        return os.environ[PREALLOCATE_VAR]
    value = "true" if preallocate else "false"
    os.environ[PREALLOCATE_VAR] = value
    started = _preallocation_fixed()
    if started:
        warnings.warn(
            f"configure_shared_gpu: the runtime of {', '.join(started)} has already started, so "
            f"{PREALLOCATE_VAR}={value} only affects new processes. Call it before the first "
            f"computation, or set {PREALLOCATE_VAR} in the shell.",
            RuntimeWarning,
            stacklevel=2,
        )
    return value


@contextlib.contextmanager
def pin_matmul_precision() -> Iterator[None]:
    """Context manager (or decorator): full float32 matmuls and convolutions on every framework.

    Each installed backend pins its own framework (its ``pin_float32_precision``, see
    :class:`duogard.backend.Backend`): inside, TF32 is off on PyTorch
    (``torch.backends.cuda.matmul`` and ``torch.backends.cudnn`` conv/RNN, and oneDNN on CPU,
    set to ``"ieee"``; on torch older than 2.9 ``allow_tf32 = False`` for cuBLAS and cuDNN and
    ``set_float32_matmul_precision("highest")``) and JAX's ``jax_default_matmul_precision`` is
    ``"highest"``. The previous settings are restored on exit, also after an exception.
    Backends whose framework is not installed are skipped; installed ones are imported.

    Example::

        with dg.interop.pin_matmul_precision():
            report = dg.parity.compare_backends(...)
    """
    restores = []
    try:
        for info in available_backends():  # loads each installed backend, with its framework
            if info.available:
                restores.append(backend(info.name).pin_float32_precision())
        yield
    finally:
        for restore in reversed(restores):
            restore()
