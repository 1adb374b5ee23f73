"""What the backends share for the DLPack exchange: the exported array, devices, and the argument
checks and error messages both backends give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Device",
    "ExportedArray",
    "GENERATORS",
    "SHARE_ALIGNMENT",
    "check_draw_rows",
    "check_generator",
    "copy_refused",
    "device_label",
    "device_spec",
    "leaf_name",
    "native_byte_order",
    "plan_move",
]

#: The alignment (bytes) of a buffer that ``dlpack_share`` hands over as is: XLA's minimum for a
#: buffer it does not copy, the strictest of the importers'.
SHARE_ALIGNMENT = 64

#: A device as the DLPack exchange names it: ``("cpu", index)`` or ``("cuda", index)``. The CPU's
#: index is 0 except in a framework that tells CPU devices apart (JAX with
#: ``--xla_force_host_platform_device_count``: ``Backend.one_host_device`` is False).
Device = tuple[str, int]


@dataclass(frozen=True, eq=False)
class ExportedArray:
    """An array on its way to another framework: what ``dlpack_export`` returns.

    It passes the DLPack protocol through to :attr:`array`, so any framework's ``from_dlpack``
    takes it, and it tells the destination what its rules need to know (layout, address, dtype)
    without the destination importing the source's framework.

    Attributes:
        array: the source framework's array, after the source's rules (a torch tensor is
            detached and its lazy conjugate/negative bits are resolved).
        backend: the source backend; :meth:`copy` asks its ``dlpack_export`` for copies.
        dtype: the dtype's name (``"float32"``, ``"bfloat16"``).
        shape: the shape.
        strides: the strides, in elements, in any order (a transposed view keeps its own).
        device: where the memory is (:data:`Device`).
        fresh: whether :attr:`array` is a new buffer that nothing else holds (a rule or a move
            copied it), so the destination may keep it instead of copying again.
        pointer: gives the first element's address (see :attr:`address`).
    """

    array: Any
    backend: Any
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    device: Device
    fresh: bool
    pointer: Callable[[], int]

    @property
    def size(self) -> int:
        """The number of elements."""
        return math.prod(self.shape)

    @property
    def address(self) -> int:
        """The first element's address, asked for only by a destination whose rules need it (a
        framework may have to wait for pending work to tell it).
        """
        return self.pointer()

    def copy(self, dtype: str | None = None) -> ExportedArray:
        """A new dense row-major buffer of the same values (cast to ``dtype`` if given), made by the
        source framework (whose allocator aligns it).
        """
        return self.backend.dlpack_export(self.array, copy=True, dtype=dtype)

    def __dlpack__(self, *args, **kwargs):
        return self.array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def native_byte_order(x):
    """``x``, or for a NumPy array in the other byte order (``np.arange(4, dtype=">f4")`` on a
    little-endian machine) a copy in the machine's own: DLPack, JAX and torch take native arrays
    only (and JAX's jit refused the array without naming it).
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and type(x).__module__ == "numpy" and not dtype.isnative:
        return x.astype(dtype.newbyteorder("="))
    return x


def check_draw_rows(kind: str, keys: Sequence[Any], sizes: Sequence[int]) -> list[int]:
    """``draw_rows``'s argument checks (see :meth:`Backend.draw_rows`): ``sizes`` as ints."""
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"draw_rows: kind must be 'normal' or 'rademacher', got {kind!r}")
    sizes = [int(s) for s in sizes]
    if len(keys) != len(sizes):
        raise ValueError(f"draw_rows: one key per block: got {len(keys)} keys for {len(sizes)} sizes")
    return sizes


GENERATORS = ("portable", "native")


def check_generator(generator: str) -> str:
    """A draw's ``generator`` argument: ``"portable"`` (duogard's Philox, the same numbers on
    every backend) or ``"native"`` (the framework's own generator); ValueError otherwise.
    """
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    return generator


# DLPack device types (DLDeviceType): CPU, CUDA, CUDA host memory, ROCm
_DL_KIND = {1: "cpu", 2: "cuda", 3: "cpu", 10: "cuda"}


def device_spec(dl_device: tuple[int, int]) -> Device:
    """A ``__dlpack_device__()`` pair as a :data:`Device`; ValueError for other device types."""
    dl_type, index = dl_device
    kind = _DL_KIND.get(int(dl_type))
    if kind is None:
        raise ValueError(
            f"convert: arrays on DLPack device type {dl_type!r} are not supported (only CPU and CUDA/ROCm)"
        )
    return kind, 0 if kind == "cpu" else int(index)


def device_label(device: Device) -> str:
    """``"cpu"`` (``"cpu:1"`` for a second CPU device) or ``"cuda:1"``."""
    return "cpu" if tuple(device) == ("cpu", 0) else f"{device[0]}:{device[1]}"


def leaf_name(where: Callable[[], str] | None) -> str:
    """An array's name in an exchange's error message: ``where()``, or ``<root>``."""
    return "<root>" if where is None else where()


def copy_refused(where: Callable[[], str] | None, reason: str) -> ValueError:
    """The error of an exchange that needs a copy for ``reason`` under ``copy=False``."""
    return ValueError(f"convert: leaf {leaf_name(where)} needs a copy ({reason}), but copy=False")


def plan_move(
    here: Device, device: Device | None, *, copy: bool | None, where: Callable[[], str] | None
) -> bool:
    """Whether an exchange moves an array from ``here`` to ``device`` (a copy: refused under
    ``copy=False``).
    """
    if device is None or tuple(device) == tuple(here):
        return False
    if copy is False:
        raise copy_refused(where, f"a move from {device_label(here)} to {device_label(device)}")
    return True
