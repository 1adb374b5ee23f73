"""Step memory on PyTorch: the storages a step allocates (a dispatch mode over the step, CPU), or
the caching allocator's peak (CUDA).
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from duogard.tree import tree_leaves


def _storages(values) -> list:
    """The storages of the tensors among ``values`` and in their lists and tuples (an op's
    arguments and results nest no deeper).
    """
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v.untyped_storage())
        elif isinstance(v, (list, tuple)):
            out.extend(_storages(v))
    return out


class _StorageTracker(TorchDispatchMode):
    """The running total of the bytes of the storages that ops allocate, and its peak.

    A storage an op returns that is none of the op's inputs' storages is new (views and
    in-place ops return their input's): its bytes are added, and subtracted when a weak
    reference sees it freed. Storages alive on entry never come back as new ones.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.finalize] = {}  # storage -> what subtracts it when freed

    def _freed(self, ident: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.pop(ident, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s._cdata for s in _storages((*args, *(kwargs or {}).values()))}
        for st in _storages((out,)):
            ident = st._cdata
            if ident in inputs or ident in self._alive:
                continue
            nbytes = st.nbytes()
            self._alive[ident] = weakref.finalize(st, self._freed, ident, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out

    def __exit__(self, *exc):
        for fin in self._alive.values():  # storages that outlive the step: no callback into us
            fin.detach()
        self._alive.clear()
        return super().__exit__(*exc)


def step_memory(fn, *args):
    cuda = [t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_cuda]
    if not cuda:
        with _StorageTracker() as tracker:
            fn(*args)
        return tracker.peak
    # CUDA: the allocator sees every allocation, whatever made it; no collection of reference
    # cycles inside the step (it would free baseline tensors there and hide the step's own)
    device, collecting = cuda[0], gc.isenabled()
    gc.disable()
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn(*args)
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - baseline, 0)
    finally:
        if collecting:
            gc.enable()
