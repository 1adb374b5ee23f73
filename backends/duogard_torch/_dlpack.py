"""The DLPack exchange on PyTorch: export with torch's rules, import, devices."""

from __future__ import annotations

import sys

import numpy as np
import torch

from duogard.backend.authoring import (
    SHARE_ALIGNMENT,
    ExportedArray,
    copy_refused,
    device_spec,
    leaf_name,
    plan_move,
)

_CPU = ("cpu", 0)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _torch_device(device):
    return torch.device("cpu") if device[0] == "cpu" else torch.device("cuda", device[1])


def dlpack_device(x, *, where=None):
    if _is_wrapped(x):
        raise TypeError(
            f"convert: leaf {leaf_name(where)} is a torch tensor traced by torch.func "
            "(grad/jvp/vmap); convert concrete tensors, outside the transform"
        )
    if x.layout != torch.strided or x.is_nested:
        layout = "nested" if x.is_nested else str(x.layout).removeprefix("torch.")
        raise TypeError(
            f"convert: leaf {leaf_name(where)} is a {layout} torch tensor; convert moves dense "
            "(strided) tensors only: make it dense first (.to_dense())"
        )
    return device_spec(x.__dlpack_device__())


def device_problem(device):
    if device[0] == "cpu" and device[1]:  # convert names torch's CPU ("cpu", 0) (one_host_device)
        return "PyTorch has one CPU device, cpu:0 (JAX's other CPU devices are JAX's own)"
    if device[0] == "cpu" or (torch.cuda.is_available() and device[1] < torch.cuda.device_count()):
        return None
    return "this PyTorch has no such device (a CUDA build of PyTorch is needed)"


def dlpack_export(x, *, copy=None, device=None, dtype=None, where=None):
    here = dlpack_device(x, where=where)
    x, fresh = x.detach(), False  # shares memory; the caller's tensor keeps requires_grad
    if x.is_conj() or x.is_neg():
        if copy is False:
            raise copy_refused(where, "a torch tensor with the lazy conjugate/negative bit")
        x, fresh = x.resolve_conj().resolve_neg(), True
    if plan_move(here, device, copy=copy, where=where):
        x, here, fresh = x.to(_torch_device(device)), tuple(device), True
    if dtype is not None:
        dtype = getattr(torch, dtype)
        if dtype != x.dtype and copy is False:
            raise copy_refused(where, f"a cast from {_name(x.dtype)} to {_name(dtype)}")
    if copy is True or (dtype is not None and dtype != x.dtype):
        # a fresh torch buffer: dense row-major, and torch's allocator aligns it
        x, fresh = x.to(dtype or x.dtype, memory_format=torch.contiguous_format, copy=True), True
    return ExportedArray(
        x,
        sys.modules[__package__],
        _name(x.dtype),
        tuple(x.shape),
        tuple(x.stride()),
        here,
        fresh,
        x.data_ptr,
    )


def dlpack_share(x):
    # attribute checks first (each a C call), the pointer last
    if x.layout is not torch.strided or x.is_nested or x.is_conj() or x.is_neg() or _is_wrapped(x):
        return None
    if x.is_cpu:  # pinned host memory too: the exchange names it the CPU
        here = _CPU
    elif x.is_cuda:  # ROCm too
        here = ("cuda", x.get_device())
    else:
        return None
    if not x.is_contiguous() or x.data_ptr() % SHARE_ALIGNMENT:
        return None
    return (x.detach() if x.requires_grad else x), here


def dlpack_importer(dtype):
    return torch.from_dlpack  # torch stores every dtype the exchange moves


def dlpack_import(obj, *, copy=None, device=None, allow_downcast=False, where=None):
    # torch stores every dtype it can import: allow_downcast has nothing to allow
    host = isinstance(obj, np.ndarray)  # NumPy memory; else an ExportedArray
    moving = plan_move(("cpu", 0) if host else obj.device, device, copy=copy, where=where)
    want_copy = copy is True and not moving and (host or not obj.fresh)
    if host:
        out = _from_numpy(obj, copy=copy, want_copy=want_copy, where=where)
    else:
        # an own tensor stays itself; another framework's array crosses (torch.from_dlpack
        # passes torch's current stream to obj.__dlpack__)
        out = obj.array if isinstance(obj.array, torch.Tensor) else torch.from_dlpack(obj)
        out = out.clone() if want_copy else out
    return out.to(_torch_device(device)) if moving else out


def _from_numpy(x, *, copy, want_copy, where):
    bf16 = x.dtype.name == "bfloat16"  # ml_dtypes: torch.from_numpy does not know it
    view = x.view(np.int16) if bf16 else x
    if not x.flags.writeable or any(s < 0 for s in x.strides):
        if copy is False:
            raise copy_refused(where, "a read-only or negatively strided NumPy array")
        view, want_copy = np.array(view, copy=True), False
    out = torch.from_numpy(view.copy() if want_copy else view)
    return out.view(torch.bfloat16) if bf16 else out


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
