"""The portable generator's draws on the host, in one call of a compiled kernel.

:mod:`duogard.backend._philox` is the specification, written in NumPy: a draw there is ~100
whole-array operations, each with microseconds of per-call overhead, so a model's tangents (a
few thousand numbers per leaf) cost ~0.5 ms, against a few microseconds for a framework's own
generator. ``_philox_kernel.c`` computes the same numbers in one C loop per key (words, uniform
numbers and signs bit for bit equal to the specification, normal numbers to float rounding:
its float32 ``log``, ``cos`` and ``sin`` are polynomials within a few ulp of the C library's).
It is built as an optional extension when the package is installed; where it was not built
(no C compiler), or ``DUOGARD_PHILOX_KERNEL=0``, these functions fall back to the NumPy
specification, with the same numbers.

A backend that draws on the host (the torch backend's small draws) calls :func:`draw_many`
and :func:`words`; :func:`kernel` says which ran (the bench's drawing table prints it).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

from duogard.backend import _philox as spec

__all__ = ["draw_many", "fold_in_many", "kernel", "words"]

_MASK64 = (1 << 64) - 1
_KINDS = {"words": 0, "uniform": 1, "normal": 2, "rademacher": 3}
_LOADED: list = []  # [(the kernel's draw and fold_in functions), or None]


def kernel():
    """The compiled kernel's draw function, or None where it is not built or is switched off
    (``DUOGARD_PHILOX_KERNEL=0``): then every draw here runs the NumPy specification.
    """
    if os.environ.get("DUOGARD_PHILOX_KERNEL", "1") == "0":
        return None
    if not _LOADED:
        _LOADED.append(_load())
    return _LOADED[0] and _LOADED[0][0]


def _fold():
    return kernel() and _LOADED[0][1]


def _load():
    spec_ = importlib.util.find_spec("duogard.backend._philox_kernel")
    if spec_ is None or not spec_.origin or not os.path.isfile(spec_.origin):
        return None
    try:
        lib = ctypes.CDLL(spec_.origin)
        draw, fold = lib.duogard_philox_draw, lib.duogard_philox_fold_in
    except (OSError, AttributeError):  # a stale or foreign build: the specification serves
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    draw.restype, draw.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int, p, p, i64, p]
    fold.restype, fold.argtypes = None, [ctypes.c_uint32, ctypes.c_uint32, p, i64, p]
    return draw, fold


def _run(fn, kind: str, keys, counts, dtype, out=None) -> np.ndarray:
    keys = np.ascontiguousarray(np.asarray(keys, dtype=np.uint32).reshape(-1, 2))
    counts = np.ascontiguousarray(np.asarray(counts, dtype=np.int64).reshape(-1))
    if len(keys) != len(counts) or (counts < 0).any():
        raise ValueError(f"draw_many: {len(keys)} keys for {len(counts)} counts, or a negative count")
    out = _out(out, int(counts.sum()), dtype)
    f64 = int(dtype == np.float64)
    if fn(_KINDS[kind], f64, keys.ctypes.data, counts.ctypes.data, len(counts), out.ctypes.data) != 0:
        raise RuntimeError(f"the Philox kernel refused the draw kind {kind!r}")  # not reached
    return out


def draw_many(kind: str, keys, counts, dtype=np.float32, out=None) -> np.ndarray:
    """``kind(keys[j], counts[j])`` (``"normal"``, ``"rademacher"`` or ``"uniform"``) for every
    ``j``, concatenated, in ``dtype`` (float32 or float64: a half-precision draw is the float32
    one rounded, which the caller does): :func:`duogard.backend._philox.draw_many`'s numbers.

    ``out``: a contiguous 1-d array of ``dtype`` and the total count to write them into (a
    framework's own buffer: the torch backend's, so that its allocation is the framework's);
    returned.
    """
    dtype = np.dtype(dtype).type
    fn = kernel()
    if fn is None or kind not in ("normal", "rademacher", "uniform") or dtype not in (np.float32, np.float64):
        numbers = spec.draw_many(kind, keys, counts, dtype)
        if out is None:
            return numbers
        _out(out, numbers.size, dtype)[...] = numbers
        return out
    return _run(fn, kind, keys, counts, dtype, out)


def _out(out, n: int, dtype) -> np.ndarray:
    """``out`` checked (a fresh array where None)."""
    if out is None:
        return np.empty(n, dtype=dtype)
    if out.dtype != dtype or out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(
            f"draw_many: out must be a writable contiguous array of {n} {np.dtype(dtype).name}, got "
            f"{out.dtype.name} of shape {out.shape}"
        )
    return out


def words(key, n: int) -> np.ndarray:
    """The first ``n`` words of ``key``'s stream (uint32): :func:`duogard.backend._philox.words`."""
    fn = kernel()
    if fn is None:
        return spec.words(key, n)
    return _run(fn, "words", [key], [int(n)], np.uint32)


def fold_in_many(key, data) -> np.ndarray:
    """``fold_in(key, d)`` for every ``d`` in ``data``, as a ``(len(data), 2)`` int64 array of
    the two words: :func:`duogard.backend._philox.fold_in_many_words`, in one kernel call.
    """
    fn = _fold()
    if fn is None:
        return spec.fold_in_many_words(key, data).astype(np.int64)
    d = np.array([int(x) & _MASK64 for x in data], dtype=np.uint64)
    out = np.empty((len(d), 2), dtype=np.int64)
    fn(int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF, d.ctypes.data, len(d), out.ctypes.data)
    return out
